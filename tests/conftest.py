"""Shared fixtures: a throwaway redis-server, the Slack and Buildkite fakes, and a running bot."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from app.simulators.bot import FAST, BotClient, BotLog, bot_logging, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import RedisServerMissing, redis_url_or_throwaway
from app.simulators.slack import FakeSlack


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (a Redis the tests may flush), else a throwaway redis-server."""
    try:
        with redis_url_or_throwaway() as url:
            yield url
    except RedisServerMissing as exc:
        pytest.exit(str(exc), returncode=3)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def bk() -> AsyncIterator[FakeBuildkite]:
    async with FakeBuildkite() as fake:
        yield fake
        assert fake.unexpected == [], f"unexpected Buildkite requests: {fake.unexpected}"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake
        assert fake.unexpected == [], f"unexpected Slack requests: {fake.unexpected}"


@pytest.fixture
def bot_log(slack: FakeSlack) -> Iterator[BotLog]:
    """The bot's own logging at its most talkative (LOG_LEVEL=DEBUG), into a string.

    Whatever the test did, no secret and no response_url (none under the fake's SLACK_HOOKS_URL)
    may have reached a line.
    """
    with bot_logging("DEBUG") as log:
        yield log
        assert log.leaks(slack.hooks_url) == []


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so that a developer's own .env is never read by a test."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> AsyncIterator[BotClient]:
    """The bot, running on a real port against the fakes, with one pipeline: deploy-prod, and
    without Slack pacing."""
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url, tuning=FAST) as client:
        yield client
