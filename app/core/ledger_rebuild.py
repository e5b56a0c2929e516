"""Rebuilding the release ledger from Buildkite after Redis was lost (`python -m app ledger
rebuild`): Buildkite's builds are the ledger's source of truth, listed with filters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from app.core.policy import Policy, Route
from app.core.releases import (
    COPIED_ON_REBUILD,
    deploy_routes,
    deployment_from,
    info_of,
    is_bot_build,
)
from app.storage.keys import LEDGER_KEEP
from app.storage.ledger import Deployment, Outcome, PipelineInfo, Source
from app.storage.store import Store
from buildkite.client import BuildkiteClient
from buildkite.client.builds import SOURCE_META_KEY, SOURCE_META_VALUE
from buildkite.errors import BuildkiteError


@dataclass
class RebuildReport:
    """What `ledger rebuild` read and wrote."""

    builds_read: int = 0
    recorded: int = 0
    pipelines: set[str] = field(default_factory=set)
    #: Deployments still running, left to the bot to follow to their end (app.core.ledger_followup).
    followed_up: int = 0
    #: Why it stopped before the end (Buildkite's error, a 429 longer than the client waits):
    #: what was read before is recorded all the same.
    stopped: str | None = None


async def rebuild_ledger(
    store: Store, buildkite: BuildkiteClient, policy: Policy, *, now: datetime | None = None
) -> RebuildReport:
    """Record again every deployment of the last LEDGER_KEEP from Buildkite.

    The bot's own builds come from ONE org-wide list filtered on its meta_data (100 builds a
    request); the builds of `deploy: true` routes from one list per routed pipeline (and one list
    of pipelines when a route names a glob). Writing an entry already there changes nothing.
    """
    now = now or datetime.now(UTC)
    since = now - timedelta(seconds=LEDGER_KEEP)
    report = RebuildReport()
    try:
        await _read(store, buildkite, policy, report, now=now, since=since)
    except BuildkiteError as exc:
        report.stopped = str(exc)
    return report


async def _read(
    store: Store,
    buildkite: BuildkiteClient,
    policy: Policy,
    report: RebuildReport,
    *,
    now: datetime,
    since: datetime,
) -> None:
    async for build in buildkite.list_builds(
        meta_data={SOURCE_META_KEY: SOURCE_META_VALUE},
        created_from=since,
        exclude_jobs=True,
    ):
        report.builds_read += 1
        slug = build.pipeline.slug if build.pipeline else None
        if slug is None:
            continue
        entry = deployment_from(build, slug, source=Source.BOT)
        if build.rebuilt_from is not None:
            # A Buildkite rebuild copies its original's meta_data: who asked, who approved, and
            # a rollback's or a promotion's mark are the original's, not this build's (as the
            # live ledger records it, app.core.releases.LedgerRecorder.on_final).
            entry = entry.model_copy(update=dict.fromkeys(COPIED_ON_REBUILD))
        await _rebuilt(store, report, entry, info_of(build.pipeline), now)
    for slug, branches in await _routed_pipelines(buildkite, policy.data.notifications):
        async for build in buildkite.list_builds(
            pipeline=slug,
            branch=branches,
            state="finished",
            created_from=since,
            exclude_jobs=True,
        ):
            report.builds_read += 1
            if not build.is_final or is_bot_build(build):
                continue  # the bot's own were listed above
            if not deploy_routes(policy, slug, build.branch):
                continue
            entry = deployment_from(build, slug, source=Source.ROUTE)
            await _rebuilt(store, report, entry, info_of(build.pipeline), now)


async def _rebuilt(
    store: Store, report: RebuildReport, entry: Deployment, info: PipelineInfo | None, now: datetime
) -> None:
    if await store.record_deployment(entry, info=info, now=now.timestamp()):
        report.recorded += 1
    report.pipelines.add(entry.pipeline)
    if entry.outcome is Outcome.RUNNING and await store.find(entry.pipeline, entry.number) is None:
        # No tracker follows it (its record went with Redis): the bot asks how it ended.
        await store.follow_up_deployment(entry.pipeline, entry.number, at=now.timestamp())
        report.followed_up += 1


async def _routed_pipelines(
    buildkite: BuildkiteClient, routes: Sequence[Route]
) -> list[tuple[str, list[str] | None]]:
    """Each pipeline a `deploy: true` route covers, with the branches to list (None: all)."""
    wanted: dict[str, list[str] | None] = {}
    globs: list[Route] = []

    def add(slug: str, route: Route) -> None:
        if slug in wanted and wanted[slug] is None:
            return
        if route.branches is None:
            wanted[slug] = None
        else:
            wanted[slug] = sorted({*(wanted.get(slug) or []), *route.branches})

    for route in routes:
        if not route.deploy:
            continue
        for pattern in route.pipelines:
            if any(c in pattern for c in "*?["):
                globs.append(route)
            else:
                add(pattern, route)
    if globs:
        async for pipeline in buildkite.list_pipelines():
            for route in globs:
                if route.matches(pipeline.slug, None) or (
                    route.branches is not None
                    and any(route.matches(pipeline.slug, b) for b in route.branches)
                ):
                    add(pipeline.slug, route)
    return sorted(wanted.items())
