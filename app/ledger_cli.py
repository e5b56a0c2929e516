"""`python -m app ledger rebuild`: the release ledger recorded again from Buildkite (after
Redis was lost), with what it cost in Buildkite requests.

The bot's own builds come from one org-wide list filtered on its meta_data, 100 builds a request;
the builds of `deploy: true` routes from one list per routed pipeline. Recording an entry that is
already there changes nothing, so running it on a live ledger is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

from app.clients import buildkite_http, create_buildkite_client
from app.core.ledger_rebuild import RebuildReport, rebuild_ledger
from app.core.policy import PolicyError, load_policy
from app.ops.metrics import Metrics
from app.settings import Settings, SettingsError, load_settings
from app.storage.connection import connect_redis
from app.storage.store import Store
from buildkite.errors import BuildkiteError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="ledger_action", metavar="{rebuild}", required=True)
    actions.add_parser(
        "rebuild",
        help="record the ledger again from Buildkite's builds (after losing Redis)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


async def rebuild(settings: Settings) -> tuple[RebuildReport, int]:
    """Rebuild the ledger in REDIS_URL's Redis; returns the report and the requests sent."""
    policy = load_policy(settings.policy_file)
    sent = 0

    async def count(_: httpx.Request) -> None:
        nonlocal sent
        sent += 1

    async with buildkite_http(settings) as http:
        http.event_hooks = {"request": [count], "response": []}
        redis_client = connect_redis(settings, Metrics())
        buildkite = create_buildkite_client(settings, http)
        try:
            report = await rebuild_ledger(Store(redis_client), buildkite, policy)
        finally:
            await buildkite.aclose()
            await redis_client.aclose()
    return report, sent


def main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print("The ledger cannot be rebuilt; fix these settings:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if settings.redis_url is None:
        print(
            "REDIS_URL is not set: without it the bot keeps its ledger in its own process, "
            "which this command cannot reach. Set REDIS_URL to the bot's Redis.",
            file=sys.stderr,
        )
        return 2
    try:
        report, sent = asyncio.run(rebuild(settings))
    except PolicyError as exc:
        print(f"The policy file cannot be read: {exc}", file=sys.stderr)
        return 2
    except BuildkiteError as exc:
        print(f"Buildkite refused: {exc}", file=sys.stderr)
        return 1
    print(summary(report, sent))
    if report.stopped is not None:
        print(
            f"Stopped before the end: {report.stopped}. What was read is recorded; run it again "
            "later (it changes nothing already recorded).",
            file=sys.stderr,
        )
        return 1
    return 0


def summary(report: RebuildReport, sent: int) -> str:
    """What a rebuild read and wrote, and what it cost in Buildkite requests (each 429 too)."""
    line = (
        f"Read {report.builds_read} builds in {sent} Buildkite requests; recorded "
        f"{report.recorded} deployments of {len(report.pipelines)} pipelines "
        "(the others were in the ledger already)."
    )
    if report.followed_up:
        line += (
            f" {report.followed_up} still running: the bot asks Buildkite how they end "
            "and records it."
        )
    return line
