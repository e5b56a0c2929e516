"""`python -m app`: start the bot with settings from the environment or `.env`.

`python -m app --check-config` checks the settings and tokens instead, and
`python -m app sandbox` runs the bot against local fakes of Slack and Buildkite, and
`python -m app ledger rebuild` records the release ledger again from Buildkite.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from app.ops import logs
from app.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Slack ChatOps bot for Buildkite. Settings come from the environment or .env.",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings, the policy file, and the tokens against Slack, Buildkite and "
        "Redis; print one line per check and exit 0 if all pass, else 1",
    )
    commands = parser.add_subparsers(dest="command", metavar="{sandbox,ledger}")
    from app import sandbox as sandbox_mode

    sandbox_mode.add_arguments(
        commands.add_parser(
            "sandbox",
            help="try the bot locally against fakes of Slack and Buildkite (no credentials)",
            description=sandbox_mode.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    from app import ledger_cli

    ledger_cli.add_arguments(
        commands.add_parser("ledger", help="the release ledger: `ledger rebuild` from Buildkite")
    )
    args = parser.parse_args(argv)
    if args.command == "sandbox":
        return sandbox_mode.main(args)
    if args.command == "ledger":
        return ledger_cli.main(args)
    try:
        settings = load_settings()
    except SettingsError as exc:
        if args.check_config:
            for problem in exc.problems:
                print(f"✗ settings: {problem}")
            print("The other checks need valid settings (environment or .env): fix these first.")
            return 1
        print("The bot cannot start; fix these settings (environment or .env):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    secrets = logs.secrets_of(settings)
    if args.check_config:
        from app.ops.checks import check_config, report

        logs.configure("ERROR", secrets)
        text, ok = report(asyncio.run(check_config(settings)), logs.RedactSecrets(secrets).redact)
        print(text)
        return 0 if ok else 1
    logs.configure(settings.log_level, secrets)

    from app.core.policy import PolicyError
    from app.main import run

    try:
        run(settings)
    except PolicyError as exc:
        print("The bot cannot start; fix the policy file (POLICY_FILE):", file=sys.stderr)
        for problem in str(exc).splitlines():
            print(f"  - {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
