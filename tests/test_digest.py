"""Build-health digests: the exact arithmetic on a fixture, the on-demand command and what it
costs at Buildkite, and schedules that post once per slot across processes and after downtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.core.digest import compute_digest, latest_slot, nearest_rank, run_digest_schedules
from app.settings import DigestSchedule, Settings
from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack.render.digest import health_digest
from app.storage.keys import DIGEST_LAST_KEY
from buildkite.client import BuildkiteClient
from buildkite.models import Build

UNTIL = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
CHANNEL = "C0CHAN"
ORG_BUILDS = "/organizations/acme/builds"


def build(
    slug: str,
    number: int,
    state: str,
    seconds: int | None = None,
    *,
    hours_ago: float = 1,
    retried: bool = False,
) -> Build:
    created = UNTIL - timedelta(hours=hours_ago)
    data: dict[str, Any] = {
        "id": f"{slug}-{number}",
        "number": number,
        "state": state,
        "web_url": f"https://buildkite.com/acme/{slug}/builds/{number}",
        "created_at": created.isoformat(),
        "pipeline": {"slug": slug},
        "jobs": [{"id": f"{slug}-{number}-job", "type": "script", "state": "passed"}],
    }
    if seconds is not None:
        started = created + timedelta(seconds=30)
        data["started_at"] = started.isoformat()
        data["finished_at"] = (started + timedelta(seconds=seconds)).isoformat()
    if retried:
        data["jobs"].insert(0, {"id": "old", "type": "script", "state": "failed", "retried": True})
    return Build.model_validate(data)


def fixture() -> list[Build]:
    web = [build("web", n, "passed", 60 * n) for n in range(1, 9)]  # 1 to 8 minutes
    web += [build("web", 9, "failed", 540), build("web", 10, "failed", 600)]
    web += [build("web", 11, "failed", 3600), build("web", 12, "canceled", 5)]
    web += [build("web", 13, "running"), build("web", 14, "passed", 90, retried=True)]
    api = [build("api", 1, "passed", 10), build("api", 2, "failed", 20)]
    api += [build("api", 3, "passed", 30), build("api", 4, "failed", 40)]
    docs = [build("docs", 1, "failed", 100), build("docs", 2, "passed", 100, retried=True)]
    ops = [build("ops", 1, "passed", 5), build("ops", 2, "failed", 7), build("ops", 3, "failed", 9)]
    # Outside the 24 hours before UNTIL: read, but not counted.
    old = [build("web", 99, "failed", 1, hours_ago=25)]
    return web + api + docs + ops + old


# -- the arithmetic ------------------------------------------------------------------------------


def test_nearest_rank() -> None:
    assert nearest_rank([], 50) is None
    assert nearest_rank([7], 95) == 7
    assert nearest_rank([10, 20, 30, 40], 50) == 20  # the lower middle of an even count
    assert nearest_rank(list(range(1, 21)), 95) == 19  # rank ceil(19.0)
    assert nearest_rank(list(range(1, 22)), 95) == 20  # rank ceil(19.95)


def test_the_digest_figures_on_a_fixture() -> None:
    result = compute_digest(
        fixture(), scope="all", window="24h", until=UNTIL, requests=3, jobs_read=9
    )
    rows = {row.slug: row for row in result.pipelines}
    assert list(rows) == ["api", "docs", "ops", "web"]
    web = rows["web"]
    # 14 builds: 9 passed, 3 failed, 1 canceled, 1 running; durations of the 12 passed or failed:
    # 60..480, 90, 540, 600, 3600 -> sorted rank 6 (median) is 300, rank 12 (p95) 3600.
    assert (web.builds, web.passed, web.failed) == (14, 9, 3)
    assert web.pass_rate == 9 / 12
    assert (web.median, web.p95) == (300, 3600)
    assert (web.flaky, web.flaky_urls) == (1, ("https://buildkite.com/acme/web/builds/14",))
    api = rows["api"]
    assert (api.builds, api.pass_rate, api.median, api.p95) == (4, 0.5, 20, 40)
    assert (rows["docs"].median, rows["docs"].p95, rows["docs"].flaky) == (100, 100, 1)
    # Most failures first; equal failures (api, ops: 2) by the lower pass rate.
    assert [row.slug for row in result.top_failing] == ["web", "ops", "api"]
    assert [row.slug for row in result.flaky] == ["docs", "web"]
    assert result.builds_read == 24
    assert result.since == UNTIL - timedelta(hours=24)

    text = json.dumps(health_digest(result).blocks)
    assert "web           14    75%    5m 0s    1h 0m       3" in text
    assert "api            4    50%      20s      40s       2" in text
    assert "ops            3    33%       7s       9s       2" in text
    assert "`web`: 3 failed of 14 (pass rate 75%)" in text
    assert "`docs`: 1 passed build after a retried job (<https://buildkite.com/acme/docs" in text
    assert "Read 24 builds in 3 Buildkite API requests" in text
    assert "of which 9 passed builds re-read with their jobs" in text
    assert "median and p95 by nearest rank" in text


def test_without_jobs_there_is_no_flaky_signal() -> None:
    result = compute_digest(
        fixture(), scope="web", window="7d", until=UNTIL, requests=1, jobs_read=None
    )
    assert result.flaky == () and all(row.flaky == 0 for row in result.pipelines)
    assert "Flaky" not in json.dumps(health_digest(result).blocks)


def test_latest_slot_daily_and_weekly() -> None:
    daily = DigestSchedule(channel=CHANNEL, at="09:00")
    assert latest_slot(daily, UNTIL) == UNTIL
    assert latest_slot(daily, UNTIL - timedelta(seconds=1)) == UNTIL - timedelta(days=1)
    weekly = DigestSchedule(channel=CHANNEL, at="08:30", weekday="mon")  # UNTIL is a Tuesday
    assert latest_slot(weekly, UNTIL) == datetime(2026, 3, 9, 8, 30, tzinfo=UTC)
    assert latest_slot(weekly, datetime(2026, 3, 9, 8, 0, tzinfo=UTC)) == datetime(
        2026, 3, 2, 8, 30, tzinfo=UTC
    )


def test_schedules_are_checked_at_start() -> None:
    base: dict[str, Any] = {
        "slack_bot_token": "xoxb-x",
        "slack_signing_secret": "s",
        "buildkite_api_token": "t",
        "buildkite_org": "acme",
        "_env_file": None,
    }
    settings = Settings(
        **base, digest_schedules='[{"channel": "C0123", "at": "07:15", "pipelines": "web"}]'
    )
    assert settings.digest_schedules[0].pipelines == ["web"]
    with pytest.raises(ValueError, match="schedule 1: window"):
        Settings(**base, digest_schedules='[{"channel": "C0123", "at": "07:15", "window": "1y"}]')


# -- on demand -----------------------------------------------------------------------------------


async def seed(bk: FakeBuildkite) -> None:
    """Builds of known durations; one web build passed after its Test job was retried."""
    bk.add_pipeline("web", steps=("Test",))
    bk.add_pipeline("api", steps=("Test",))
    start = datetime.now(UTC) - timedelta(hours=2)
    for slug, state, seconds in [
        ("web", "passed", 100),
        ("web", "failed", 300),
        ("web", "passed", 200),
        ("api", "passed", 50),
    ]:
        failed = ["Test"] if state == "failed" else []
        data = bk.add_build(slug, state=state, failed_jobs=failed, created_at=start)
        data["started_at"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        data["finished_at"] = (start + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    flaky = bk.add_build("web", state="failed", failed_jobs=["Test"], created_at=start)
    async with BuildkiteClient(bk.token, bk.org, base_url=bk.url) as client:
        await client.retry_job("web", flaky["number"], flaky["jobs"][0]["id"])
    bk.set_build_state("web", flaky["number"], "passed")
    bk.build("web", flaky["number"])["started_at"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    bk.build("web", flaky["number"])["finished_at"] = (start + timedelta(seconds=400)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    bk.clear_requests()


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> AsyncIterator[BotClient]:
    await seed(bk)
    async with running_bot(slack, bk, redis_url) as client:
        bk.clear_requests()
        yield client


async def test_health_on_demand_reads_100_builds_a_page(bot: BotClient, bk: FakeBuildkite) -> None:
    _, name, _ = await bot.command("/buildkite", "health all 24h")
    (reply,) = await bot.slack.wait_for(
        lambda: [p.json for p in bot.slack.responses if p.name == name]
    )
    text = json.dumps(reply["blocks"])
    # web: 4 builds, 3 passed of 4 finished; durations 100, 200, 300, 400 -> median 200, p95 400.
    assert "web            4    75%   3m 20s   6m 40s       1" in text
    assert "api            1   100%      50s      50s       0" in text
    assert "`web`: 1 passed build after a retried job" in text
    assert "Read 5 builds in 2 Buildkite API requests" in text
    listing, passed = bk.requests
    assert listing.api_path == passed.api_path == ORG_BUILDS
    assert (listing.param("per_page"), listing.param("exclude_jobs")) == ("100", "true")
    assert listing.param("created_from") is not None
    assert passed.params("state[]") == ["passed"]
    assert (passed.param("include_retried_jobs"), passed.param("exclude_jobs")) == ("true", None)

    bk.clear_requests()
    _, name, _ = await bot.command("/buildkite", "health api 7d")
    await bot.slack.wait_for(lambda: bot.response_texts(name))
    assert "Build health of api, last 7d" in bot.response_texts(name)[0]
    assert {r.api_path for r in bk.requests} == {"/organizations/acme/pipelines/api/builds"}


# -- schedules ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def schedules_running(bots: Sequence[BotClient]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_digest_schedules(b.services, stop, tick=0.02)) for b in bots]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def digests(slack: FakeSlack) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if "Build health" in c.args.get("text", "")]


def schedule_at(moment: datetime) -> dict[str, str]:
    return {"channel": CHANNEL, "at": moment.strftime("%H:%M"), "window": "24h"}


async def test_a_schedule_fires_once_with_two_processes(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    await seed(bk)
    schedules = [schedule_at(datetime.now(UTC) - timedelta(minutes=1))]
    async with (
        running_bot(slack, bk, redis_url, digest_schedules=schedules) as one,
        running_bot(slack, bk, redis_url, digest_schedules=schedules) as two,
        schedules_running([one, two]),
    ):
        await slack.wait_for(lambda: digests(slack))
        await asyncio.sleep(0.3)  # many more ticks of both
        (posted,) = digests(slack)
        key = one.services.settings.digest_schedules[0].key
    blocks = json.dumps(posted.args["blocks"])
    assert "web            4    75%" in blocks and "posted late" not in blocks
    slot = latest_slot(DigestSchedule.model_validate(schedules[0]), datetime.now(UTC))
    last = await redis_client.get(DIGEST_LAST_KEY.format(schedule=key))
    assert int(last) == int(slot.timestamp())
    assert await redis_client.ttl(DIGEST_LAST_KEY.format(schedule=key)) > 0


async def test_a_slot_missed_while_down_is_posted_late_once(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    await seed(bk)
    schedules = [schedule_at(datetime.now(UTC) - timedelta(hours=3))]
    schedule = DigestSchedule.model_validate(schedules[0])
    slot = latest_slot(schedule, datetime.now(UTC))
    # The digest three days ago was posted; the two since were missed while the bot was down.
    last_key = DIGEST_LAST_KEY.format(schedule=schedule.key)
    await redis_client.set(last_key, int((slot - timedelta(days=3)).timestamp()))
    async with (
        running_bot(slack, bk, redis_url, digest_schedules=schedules) as one,
        running_bot(slack, bk, redis_url, digest_schedules=schedules) as two,
        schedules_running([one, two]),
    ):
        await slack.wait_for(lambda: digests(slack))
        await asyncio.sleep(0.3)
        async with schedules_running([one]):  # as if restarted
            await asyncio.sleep(0.1)
    (posted,) = digests(slack)
    blocks = json.dumps(posted.args["blocks"])
    assert f"Scheduled for {slot.strftime('%d %b %H:%M UTC')}; posted late" in blocks
    assert f"to {slot.strftime('%d %b %H:%M UTC')}" in blocks
    assert int(await redis_client.get(last_key)) == int(slot.timestamp())
