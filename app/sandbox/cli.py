"""The sandbox's command line: its options, and a session of the real bot wired to the fakes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import TextIO

from app.core.policy.loading import PolicyError, load_policy
from app.ops import logs
from app.sandbox.session import AGENTS, HELP, PEOPLE, Session
from app.settings import Settings

PIPELINES = ("web", "api")
#: `--policy demo`: the policy shipped with the sandbox (see demo_policy.yml).
DEMO_POLICY = "demo"
#: Without --policy: the bot's own default, policy.yml in the working directory if there is one
#: (else everyone may do everything, and the bot says so).
DEFAULT_POLICY = "policy.yml"


def demo_policy_path() -> Path:
    """The bundled demo policy, wherever the package is installed."""
    return Path(str(resources.files("app.sandbox").joinpath("demo_policy.yml")))


def policy_file_for(policy: str | None) -> str:
    """The policy file `--policy` names: the demo's, a file's, or the bot's default."""
    return str(demo_policy_path()) if policy == DEMO_POLICY else policy or DEFAULT_POLICY


def policy_words(policy: str | None, policy_file: str) -> str:
    """The policy, as the sandbox's first line names it."""
    if policy == DEMO_POLICY:
        return "the demo policy"
    if Path(policy_file).is_file():
        return f"policy {policy_file}"
    # A newcomer's first run: point at the policy that shows refusals, approvals and locks.
    return "no policy: everyone may do everything (try --policy demo)"


class HideUnhandledRequests(logging.Filter):
    """Bolt's warning for a request no listener takes (an unknown slash command) is for the
    bot's developers; the sandbox answers the person itself ("is /foo one of its commands?")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name.startswith("slack_bolt")
            and record.getMessage().startswith("Unhandled request")
        )


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
    parser.add_argument(
        "--as",
        dest="person",
        default="alice",
        choices=sorted(PEOPLE),
        help="who you are at the start (type `as bob` to switch)",
    )
    parser.add_argument(
        "--policy",
        metavar="FILE",
        help="a policy file, or `demo` for the bundled demo policy (default: ./policy.yml if any)",
    )


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
    if args.policy and args.policy != DEMO_POLICY and not Path(args.policy).is_file():
        print(f"--policy: no file {args.policy!r} (or use --policy demo)", file=sys.stderr)
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
    for handler in logging.getLogger().handlers:
        handler.addFilter(HideUnhandledRequests())
    policy_file = policy_file_for(args.policy)
    if Path(policy_file).is_file():
        try:
            load_policy(policy_file)  # its problems, one a line, before anything starts
        except PolicyError as exc:
            print(f"{exc}\nThe sandbox did not start: fix the policy file.", file=sys.stderr)
            return 2
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

    person = PEOPLE[getattr(args, "person", None) or "alice"]
    policy = getattr(args, "policy", None)
    policy_file = policy_file_for(policy)
    async with FakeSlack() as slack, FakeBuildkite() as bk:
        for slug in PIPELINES:
            bk.add_pipeline(slug, default_branch="main")
        for name in AGENTS:
            bk.add_agent(name)
        for someone in PEOPLE.values():
            if someone.user_id not in slack.users:
                slack.add_user(someone.user_id, someone.name, f"{someone.name}@example.com")
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
            policy_file=policy_file,
            poll_interval=60,
            _env_file=None,
        )
        async with start_bot(settings, host="127.0.0.1", port=0) as running:
            # The fake has no rate limit: Slack's pacing follows the sandbox's clock.
            running.services.outbox.post_interval /= args.speed
            running.services.outbox.edit_interval /= args.speed
            client = BotClient(running, slack, bk)
            session = Session(
                slack, bk, client, out, fail=args.fail, speed=args.speed, person=person
            )
            simulator = asyncio.create_task(session.simulate_builds())
            try:
                rules = policy_words(policy, policy_file)
                session.say(
                    f"Sandbox: the bot listens on {client.base}, against fake Slack and "
                    f"Buildkite. You are @{person.name} in #deploys (`as NAME` switches: "
                    f"{', '.join(PEOPLE)}); pipelines: {', '.join(PIPELINES)}; agents: "
                    f"{', '.join(AGENTS)}; {rules}; builds {'fail' if args.fail else 'pass'}, "
                    f"speed ×{args.speed:g}."  # noqa: RUF001
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
