"""The HTTP access log keeps failed requests only: a line per acknowledged Slack request would cost
a good part of the ack's own CPU, and Prometheus already counts those requests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.simulators import slack_requests
from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> AsyncIterator[BotClient]:
    async with running_bot(slack, bk, redis_url) as client:
        yield client


async def test_only_failed_requests_reach_the_access_log(
    bot: BotClient, slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]

    resp, _, _ = await bot.command("/deploy", "help")
    assert resp.status == 200
    body, headers = slack_requests.slash_command(
        "/deploy", "web", response_url=slack.response_url("x"), signing_secret="wrong-secret"
    )
    assert (await bot.post_slack(body, headers)).status == 401
    (line,) = await slack.wait_for(access_lines)
    assert '"POST /slack/events HTTP/1.1" 401' in line
