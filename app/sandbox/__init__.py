"""Try the bot locally: the real bot, wired to fakes of Slack and Buildkite on 127.0.0.1.

Type slash commands as you would in Slack (`/deploy web main`); the bot's messages are printed,
their buttons numbered (type the number, or the button's label, to press it), and `as bob`
switches between the simulated people. Builds move on by themselves on simulated agents
(scheduled, running, then passed, or failed with --fail) and reach the bot as signed webhooks.
No credentials are needed and nothing leaves this machine; tracking uses the embedded store
unless --redis-url is given. docs/sandbox.md has the whole of it, and a scripted tour.

    python -m app sandbox
    python -m app sandbox --policy demo --as bob          # the bundled demo policy
    python -m app sandbox --run "/deploy web main" --run Rebuild   # print a transcript
    python -m app sandbox --script demo.txt --fail --speed 4

The simulators of Slack and Buildkite (app.simulators) ship with the package, so it runs from
any directory of an installed bot, the Docker image's included.
"""

from app.sandbox.cli import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
