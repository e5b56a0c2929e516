"""Shared fixtures: a throwaway redis-server, the Slack and Buildkite fakes, and a running bot."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
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


#: The tests that take many seconds (mostly waiting: bots as processes, redis-py giving up on
#: sentinels, a wheel built and installed), with about how many on two cores.
LONG_TESTS = {
    "test_three_bots_one_killed_and_half_the_webhooks_lost": 21,
    "test_the_installed_package_runs_it_from_any_directory": 15,
    "test_a_redis_restart_mid_run_loses_nothing_and_repeats_nothing": 16,
    "test_buildkite_429_storms_and_5xx_bursts_start_each_build_once": 11,
    "test_a_create_seen_only_after_the_bots_patience_is_adopted_once": 9,
    "test_a_create_answered_after_the_timeout_starts_one_build_followed_to_its_end": 8,
    "test_builds_that_finish_while_buildkite_is_down_get_their_final_message": 8,
    "test_a_rebuild_answered_after_the_timeout_starts_one_rebuild": 8,
    "test_check_config_masks_every_form": 5,
    "test_a_deploy_over_stdio_is_followed_by_the_running_bot": 6,
    "test_a_burst_of_changes_under_slack_429s_ends_with_every_message_true": 5,
    "test_a_post_answered_while_redis_is_down_is_recorded_not_repeated": 5,
    "test_a_dm_is_sent_once_when_its_sender_is_killed": 12,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests first, and shared out: pytest-xdist's worksteal hands each worker one slice
    of this order and steals only from a slice's end, so each slice starts with its share of
    the long tests (the longest to the slice with the least so far)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    long = sorted(
        (item for item in items if item.name in LONG_TESTS), key=lambda i: -LONG_TESTS[i.name]
    )
    rest = [item for item in items if item.name not in LONG_TESTS]
    slices: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for item in long:
        min(slices, key=lambda s: sum(LONG_TESTS[i.name] for i in s)).append(item)
    # The slice sizes worksteal sends: what is left, shared out among the workers left.
    left = len(items)
    for index, part in enumerate(slices):
        size = left // (workers - index)
        left -= size
        wanted = max(size - len(part), 0)
        part.extend(rest[:wanted])
        del rest[:wanted]
    items[:] = [item for part in slices for item in part] + rest


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


@pytest.fixture(autouse=True)
def _fresh_redis(request: pytest.FixtureRequest) -> None:
    """Every test that uses the worker's Redis starts on an empty database, whether or not it
    asks for `redis_client`: what an earlier test left (claimed event ids, debounce marks,
    leases) would otherwise change what the next one's bots do. A module whose one bot runs
    through all its tests (`SHARED_BOT = True`) keeps its Redis: flushing under a running bot
    would wipe its streams and leases."""
    if "redis_url" not in request.fixturenames or getattr(request.module, "SHARED_BOT", False):
        return
    url = request.getfixturevalue("redis_url")
    with sync_redis.Redis.from_url(url, socket_timeout=30) as client:
        client.flushdb()


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
