"""`python -m app`: start the bot with settings from the environment or `.env`."""

from __future__ import annotations

import argparse
import sys

from app import logs
from app.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Slack ChatOps bot for Buildkite. Settings come from the environment or .env.",
    )
    parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print("The bot cannot start; fix these settings (environment or .env):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if settings.redis_url is None:
        print(
            "The bot cannot start; fix these settings (environment or .env):\n"
            "  - REDIS_URL is not set (e.g. redis://localhost:6379/0)",
            file=sys.stderr,
        )
        return 2
    secrets = [
        s.get_secret_value()
        for s in (
            settings.slack_bot_token,
            settings.slack_signing_secret,
            settings.slack_app_token,
            settings.buildkite_api_token,
            settings.buildkite_webhook_token,
        )
        if s is not None
    ]
    logs.configure(settings.log_level, secrets)

    from app.main import run

    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
