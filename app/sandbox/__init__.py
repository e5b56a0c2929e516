"""Try the bot locally: the real bot, wired to fakes of Slack and Buildkite on 127.0.0.1.

Type slash commands as you would in Slack (`/deploy web main`); the bot's messages are printed,
their buttons numbered (type the number, or the button's label, to press it). Builds move on by
themselves (scheduled, running, then passed, or failed with --fail) and reach the bot as signed
webhooks. No credentials are needed and nothing leaves this machine; tracking uses the embedded
store unless --redis-url is given.

    python -m app sandbox
    python -m app sandbox --run "/deploy web main" --run Rebuild   # print a transcript
    python -m app sandbox --script demo.txt --fail --speed 4

The simulators of Slack and Buildkite (app.simulators) ship with the package, so it runs from
any directory of an installed bot, the Docker image's included.
"""

from app.sandbox.cli import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
