"""The sandbox's and the tests' simulators of Slack and Buildkite, shipped with the bot.

Real HTTP servers on 127.0.0.1 that answer like Slack and Buildkite and fail loudly on any request
they do not expect; `python -m app sandbox`, the test suite and the benchmarks all use them.
"""
