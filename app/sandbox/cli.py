"""The sandbox's command line: its options, and a session of the real bot wired to the fakes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TextIO

from app.ops import logs
from app.sandbox.session import HELP, Session
from app.settings import Settings

PIPELINES = ("web", "api")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fail", action="store_true", help="make every build fail")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="how fast builds move (2 = twice as fast)"
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="LINE",
        help="a line to run as if typed (repeatable); prints the transcript and exits",
    )
    parser.add_argument("--script", metavar="FILE", help="run the lines of FILE (# comments)")
    parser.add_argument("--redis-url", help="track builds in this Redis instead of in memory")


def main(args: argparse.Namespace) -> int:
    try:
        from app.simulators.buildkite import FakeBuildkite  # noqa: F401
        from app.simulators.slack import FakeSlack  # noqa: F401
    except ImportError:
        print(
            "The sandbox needs the Slack and Buildkite simulators of app.simulators, which this "
            "installation lacks: reinstall the bot's package.",
            file=sys.stderr,
        )
        return 2
    if args.speed <= 0:
        print("--speed must be positive", file=sys.stderr)
        return 2
    lines: list[str] | None = None
    if args.script:
        with open(args.script, encoding="utf-8") as script:
            lines = script.read().splitlines()
    if args.run:
        lines = (lines or []) + args.run
    if lines is None and not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    logs.configure("WARNING", [])
    try:
        return asyncio.run(run(args, lines, sys.stdout))
    except KeyboardInterrupt:
        return 130


async def run(args: argparse.Namespace, script: list[str] | None, out: TextIO) -> int:
    """Run the sandbox: the lines of `script`, or what is typed when it is None."""
    from app.main import start_bot
    from app.simulators.bot import SIGNING_SECRET, BotClient
    from app.simulators.buildkite import FakeBuildkite
    from app.simulators.slack import FakeSlack

    async with FakeSlack() as slack, FakeBuildkite() as bk:
        for slug in PIPELINES:
            bk.add_pipeline(slug, default_branch="main")
        settings = Settings(
            slack_bot_token=slack.bot_token,
            slack_signing_secret=SIGNING_SECRET,
            slack_app_token=None,
            slack_api_url=slack.api_url,
            slack_hooks_url=slack.hooks_url,
            buildkite_api_token=bk.token,
            buildkite_org=bk.org,
            buildkite_api_url=bk.url,
            buildkite_webhook_token=bk.webhook_token,
            redis_url=args.redis_url,
            log_level="WARNING",
            poll_interval=60,
            _env_file=None,
        )
        async with start_bot(settings, host="127.0.0.1", port=0) as running:
            # The fake has no rate limit: Slack's pacing follows the sandbox's clock.
            running.services.outbox.post_interval /= args.speed
            running.services.outbox.edit_interval /= args.speed
            client = BotClient(running, slack, bk)
            session = Session(slack, bk, client, out, fail=args.fail, speed=args.speed)
            simulator = asyncio.create_task(session.simulate_builds())
            try:
                session.say(
                    f"Sandbox: the bot listens on {client.base}, against fake Slack and "
                    f"Buildkite. You are @alice in #deploys; pipelines: {', '.join(PIPELINES)}; "
                    f"builds {'fail' if args.fail else 'pass'}, speed ×{args.speed:g}."  # noqa: RUF001
                )
                if script is None:
                    session.say(HELP)
                    await session.interactive()
                else:
                    await session.scripted(script)
            finally:
                simulator.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await simulator
                await client.close()
        for name, fake in (("Slack", slack.unexpected), ("Buildkite", bk.unexpected)):
            for problem in fake:
                print(f"fake {name} did not expect: {problem}", file=sys.stderr)
    return 0
