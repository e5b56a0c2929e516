"""Shared fixtures: a throwaway redis-server, the Slack and Buildkite fakes, and a running bot."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from app.simulators.bot import FAST, BotClient, BotLog, bot_logging, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import RedisServerMissing, redis_url_or_throwaway
from app.simulators.slack import FakeSlack


def worker_database(url: str, worker: str | None) -> str:
    """`url` for one pytest-xdist worker: gw0 keeps its database, gwN uses database N, so that
    workers sharing one REDIS_URL never flush each other's keys."""
    if not worker or not worker.startswith("gw") or worker == "gw0":
        return url
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{int(worker[2:])}" + (f"?{query}" if query else "")


#: Modules whose tests take tens of seconds each (bots as processes, Buildkite answering after
#: 20 s, many `python -m app` runs): started first, so that none of them ends the run alone.
LONG_FIRST = ("test_faults.py", "test_secrets.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (a Redis the tests may flush; a database of it per xdist worker), else
    a throwaway redis-server (one per worker)."""
    try:
        with redis_url_or_throwaway() as url:
            shared = bool(os.environ.get("REDIS_URL"))
            yield worker_database(url, os.environ.get("PYTEST_XDIST_WORKER")) if shared else url
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
