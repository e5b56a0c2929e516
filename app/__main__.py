"""`python -m app`: start the bot with settings from the environment or `.env`.

Instead:
- `python -m app --check-config` checks the settings and tokens;
- `python -m app sandbox` runs the bot against local fakes of Slack and Buildkite;
- `python -m app ledger rebuild` records the release ledger again from Buildkite;
- `python -m app mcp` serves one agent (BKCHATOPS_AGENT_TOKEN) over stdio (docs/agents.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import NoReturn

from pydantic import SecretStr

from app.ops import logs
from app.settings import Settings, SettingsError, load_settings

#: Where the settings are read from besides the environment (Settings' env_file).
ENV_FILE = str(Settings.model_config.get("env_file"))


class _Parser(argparse.ArgumentParser):
    """Never repeats an argument it does not know: one may be a token typed in the wrong place
    (and stderr goes to an MCP client's logs)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            message = "unrecognized arguments (not repeated: tokens go in the environment)"
        super().error(message)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m app",
        description="Slack ChatOps bot for Buildkite. Settings come from the environment or .env.",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings, the policy file, and the tokens against Slack, Buildkite and "
        "Redis; print one line per check and exit 0 if all pass, else 1",
    )
    commands = parser.add_subparsers(dest="command", metavar="{sandbox,ledger,mcp}")
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
    mcp_parser = commands.add_parser(
        "mcp",
        help="serve the agent whose token is in BKCHATOPS_AGENT_TOKEN over stdio (MCP)",
        description="The MCP server over stdin/stdout for a local client, as the agent whose "
        "bearer token is in BKCHATOPS_AGENT_TOKEN (see docs/agents.md). Logs go to stderr.",
    )
    # Taken here only to be refused without echoing them: a token given as an argument would
    # be in the process list and the client's logs (argparse repeats unknown arguments).
    mcp_parser.add_argument("unexpected", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "mcp" and args.unexpected:
        print(
            "python -m app mcp takes no arguments: put the agent's token in "
            "BKCHATOPS_AGENT_TOKEN, never on the command line.",
            file=sys.stderr,
        )
        return 2
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
            print(policy_line())
            print(
                "The other checks (Slack, Buildkite, Redis) need valid settings (environment or "
                ".env): fix these first."
            )
            return 1
        print("The bot cannot start; fix these settings (environment or .env):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        print(next_steps(exc.problems), file=sys.stderr)
        return 2
    secrets = logs.secrets_of(settings)
    if args.check_config:
        from app.ops.checks import check_config, report

        logs.configure("ERROR", secrets)
        text, ok = report(asyncio.run(check_config(settings)), logs.RedactSecrets(secrets).redact)
        print(text)
        return 0 if ok else 1
    if args.command == "mcp":
        return _mcp(settings, secrets)
    logs.configure(settings.log_level, secrets)

    from app.core.policy import PolicyError
    from app.main import run

    forget_secret_environment()
    try:
        run(settings)
    except PolicyError as exc:
        print("The bot cannot start; fix the policy file (POLICY_FILE):", file=sys.stderr)
        for problem in str(exc).splitlines():
            print(f"  - {problem}", file=sys.stderr)
        return 2
    return 0


def policy_line() -> str:
    """`--check-config`'s policy line, which needs only POLICY_FILE: a policy is checked before
    it is deployed, even where the tokens are not set."""
    from pydantic import ValidationError

    from app.ops.checks import check_policy_file
    from app.settings import PolicyFileSetting

    try:
        path = PolicyFileSetting().policy_file
    except (ValidationError, UnicodeDecodeError):
        return "✗ policy: not checked: POLICY_FILE could not be read (see the settings above)"
    check = check_policy_file(path)
    mark = "✓" if check.ok else "✗"
    return "\n".join(f"{mark} policy: {line}" for line in check.detail.splitlines())


def next_steps(problems: list[str]) -> str:
    """Where a person who cannot start the bot goes next: a first run is pointed at the
    example settings and at the sandbox, which needs none."""
    lines = []
    if any(problem.endswith((" is not set", " is empty")) for problem in problems):
        if Path(ENV_FILE).is_file():
            lines.append(
                f"New here? Fill in {ENV_FILE} (.env.example and docs/configuration.md say what "
                "each setting is)."
            )
        else:
            where = f" (there is no {ENV_FILE} in {Path.cwd()})"
            lines.append(f"New here? Copy .env.example to {ENV_FILE} and fill it in{where}.")
    lines.append("Try the bot with no credentials at all: python -m app sandbox")
    lines.append("Check settings and tokens once set: python -m app --check-config")
    return "\n".join(lines)


def forget_secret_environment() -> None:
    """Drop the secrets from this process's environment once the settings hold them.

    They then reach nothing the bot did not hand them to: a child process inherits none, and
    Bolt, which reads SLACK_BOT_TOKEN from the environment whenever it is there, no longer
    warns on every start that the client's token wins over it (it is the same token).
    """
    secret_names = {
        name.upper()
        for name, field in Settings.model_fields.items()
        if field.annotation in (SecretStr, SecretStr | None)
    }
    for name in [name for name in os.environ if name.upper() in secret_names]:
        del os.environ[name]


def _mcp(settings: Settings, secrets: list[str]) -> int:
    """`python -m app mcp`: stdout carries the protocol, so every word for people goes to
    stderr, and the agent's token joins the secrets no log line may show."""
    from app.agents.stdio import TOKEN_VARIABLE, agent_for
    from app.core.policy import PolicyError, load_policy
    from app.main import run_mcp_stdio

    token = os.environ.get(TOKEN_VARIABLE, "").strip() or None
    logs.configure(settings.log_level, [*secrets, *([token] if token else [])], sys.stderr)
    try:
        agent = agent_for(load_policy(settings.policy_file), token)
    except PolicyError as exc:
        print("The MCP server cannot start; fix the policy file (POLICY_FILE):", file=sys.stderr)
        for problem in str(exc).splitlines():
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if agent is None:
        why = "is not set" if token is None else "is no agent's token in the policy (agents:)"
        print(f"The MCP server cannot start: {TOKEN_VARIABLE} {why}.", file=sys.stderr)
        return 2
    run_mcp_stdio(settings, agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
