"""The polling fallback: what each cycle asks Buildkite, and how it backs off and resumes.

The poller runs on a clock of the test's (polls are driven by hand, each one interval later),
against the Buildkite fake and a real Redis; assertions are on the requests that reached the
fake, on what is left pending in Redis, and on the Slack messages the builds end with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from app.core.services import Services
from app.main import open_services
from app.ops.metrics import Metrics
from app.simulators.bot import BUILDKITE_TOKEN, bot_settings
from app.simulators.buildkite import FakeBuildkite, RecordedRequest
from app.simulators.slack import FakeSlack
from app.storage import keys
from app.tracking.intake import Intake
from app.tracking.poller import Poller as BuildPoller
from app.tracking.poller import PollReport, next_poll_at
from app.tuning import DEFAULT
from buildkite.client import (
    REQUEST_ID_META_KEY,
    SOURCE_META_KEY,
    SOURCE_META_VALUE,
    BuildkiteClient,
)
from buildkite.models import Build

INTERVAL = 10.0
PIPELINE = "web"
CHANNEL = "C0POLL"
ORG_BUILDS = "/v2/organizations/acme/builds"


class Clock:
    """The poller's and the fake's clock: now, plus whatever the test skipped over."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self(), UTC)


@dataclass
class Poller:
    services: Services
    intake: Intake
    polls: BuildPoller
    bk: FakeBuildkite
    clock: Clock
    redis: Any

    async def cycle(self, after: float = INTERVAL) -> tuple[PollReport, list[RecordedRequest]]:
        """Run one poll cycle `after` seconds after the last; returns what it asked Buildkite."""
        self.clock.advance(after)
        await self.redis.delete(keys.POLL_LEASE_KEY)  # the lease would have expired by now
        before = len(self.bk.requests)
        report = await self.polls.poll_once()
        return report, self.bk.requests[before:]

    async def track(self, count: int) -> list[int]:
        """Builds the bot started (tagged as its own), each followed in CHANNEL; their numbers."""
        numbers = []
        for _ in range(count):
            meta = {SOURCE_META_KEY: SOURCE_META_VALUE, REQUEST_ID_META_KEY: uuid.uuid4().hex}
            live = self.bk.add_build(PIPELINE, meta_data=meta, state="running")
            await self.intake.track(
                Build.model_validate(live), pipeline=PIPELINE, channel=CHANNEL, requester="U0USER"
            )
            numbers.append(live["number"])
        return numbers

    async def phase(self, number: int) -> str:
        tracked = await self.services.store.find(PIPELINE, number)
        assert tracked is not None
        return tracked.phase


@pytest.fixture
async def poller(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> AsyncIterator[Poller]:
    slack.add_channel(CHANNEL, "builds")
    bk.add_pipeline(PIPELINE)
    clock = Clock()
    bk.now = clock.datetime
    settings = bot_settings(slack, bk, redis_url, poll_interval=INTERVAL)
    # Failures reach the poller at once: no retries, no waiting out a 429 in the client.
    client = BuildkiteClient(
        BUILDKITE_TOKEN, bk.org, base_url=bk.url, max_retries=0, max_rate_limit_wait=0
    )
    async with open_services(settings) as services, client:
        intake = Intake(services.store, client, clock=clock)
        polls = BuildPoller(
            services.store,
            client,
            intake,
            DEFAULT.tracking,
            poll_interval=INTERVAL,
            metrics=services.poller.metrics,
            consumer=services.poller.consumer,
            clock=clock,
        )
        yield Poller(services, intake, polls, bk, clock, redis_client)


def lists(requests: list[RecordedRequest]) -> list[str]:
    """Each request as the list it reads: finished, active, or a single build's path."""
    kinds = []
    for request in requests:
        if request.path != ORG_BUILDS:
            kinds.append(request.path)
        elif request.param("finished_from"):
            kinds.append("finished")
        else:
            assert request.params("state[]"), request
            kinds.append("active")
    return kinds


def finished_from(request: RecordedRequest) -> float:
    value = request.param("finished_from")
    assert value is not None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- what each cycle asks ---------------------------------------------------------------------


def test_polls_start_at_a_fixed_rate() -> None:
    # Every interval from the last start, however long the poll took...
    assert next_poll_at(100.0, 100.0, 10.0) == 110.0
    assert next_poll_at(100.0, 107.5, 10.0) == 110.0
    # ...and a poll that overran a start skips it rather than running twice in a row.
    assert next_poll_at(100.0, 113.0, 10.0) == 120.0


async def test_finished_builds_every_cycle_active_builds_only_when_due(poller: Poller) -> None:
    numbers = await poller.track(250)  # three pages of active builds

    _, first = await poller.cycle()
    # The finished list first (it carries the final states), then every active build.
    assert lists(first) == ["finished", "active", "active", "active"]
    for request in first:
        assert request.param("meta_data[chatops_source]") == "slack"
        assert request.param("exclude_jobs") == "true" and request.param("per_page") == "100"

    # Three pages cost 18 s of the active list's budget of 10 pages a minute: the next cycle
    # only asks for what finished, and that is enough for a final message.
    poller.bk.set_build_state(PIPELINE, numbers[0], "passed")
    poller.bk.set_build_state(PIPELINE, numbers[1], "failing")
    report, second = await poller.cycle()
    assert lists(second) == ["finished"]
    assert report.requests == 1 and report.changed == 1
    assert await poller.phase(numbers[0]) == "passed"
    assert await poller.phase(numbers[1]) == "running"  # not yet: intermediate states wait

    _, third = await poller.cycle()
    assert lists(third) == ["finished", "active", "active", "active"]
    assert await poller.phase(numbers[1]) == "failing"
    assert await poller.services.store.pending_count() == 249


async def test_a_few_builds_are_listed_in_full_every_cycle(poller: Poller) -> None:
    await poller.track(3)
    for _ in range(3):
        _, requests = await poller.cycle()
        assert lists(requests) == ["finished", "active"]


async def test_the_finished_list_starts_where_buildkite_last_reported_a_finish(
    poller: Poller,
) -> None:
    numbers = await poller.track(2)
    _, first = await poller.cycle()
    # Nothing known yet: the last hour.
    assert poller.clock() - finished_from(first[0]) == pytest.approx(3600, abs=2)

    poller.bk.set_build_state(PIPELINE, numbers[0], "passed")
    reported = poller.clock()
    await poller.cycle()
    _, third = await poller.cycle()
    # Buildkite's own clock, less a little for builds not listed yet: not our clock less the
    # two minutes allowed for skew, which at 100 finishes a minute is three pages, not one.
    assert finished_from(third[0]) == pytest.approx(reported - 30, abs=1.5)

    # With no finish to go by, our clock less the allowance for skew.
    for _ in range(12):
        await poller.cycle()
    _, later = await poller.cycle()
    assert poller.clock() - finished_from(later[0]) == pytest.approx(120 + INTERVAL, abs=1.5)


async def test_a_build_no_list_mentions_is_fetched_alone_and_not_forgotten_on_failure(
    poller: Poller,
) -> None:
    [number] = await poller.track(1)
    poller.bk.set_build_state(PIPELINE, number, "passed")
    poller.bk.now = lambda: datetime(2020, 1, 1, tzinfo=UTC)  # it finished long ago: unlisted
    poller.bk.build(PIPELINE, number)["finished_at"] = "2020-01-01T00:00:00.000Z"
    poller.bk.now = poller.clock.datetime
    for _ in range(3):  # within four intervals of being tracked
        _, requests = await poller.cycle()
        assert lists(requests) == ["finished", "active"]
    single = f"/v2/organizations/acme/pipelines/{PIPELINE}/builds/{number}"
    poller.bk.fail_next(1, 502, path_contains=f"/builds/{number}")
    report, requests = await poller.cycle()
    assert lists(requests) == ["finished", "active", single]
    assert report.failed and await poller.services.store.pending_count() == 1
    _, requests = await poller.cycle(report.backoff)
    assert lists(requests) == ["finished", "active", single]
    assert await poller.phase(number) == "passed"
    assert await poller.services.store.pending_count() == 0


@pytest.mark.parametrize("status", [403, 404])
async def test_a_build_of_its_own_that_cannot_be_fetched_does_not_stop_polling(
    poller: Poller, status: int
) -> None:
    [number] = await poller.track(1)
    poller.bk.build(PIPELINE, number)["meta_data"].clear()  # say, its meta_data was lost
    poller.bk.fail_next(1, status, path_contains=f"/builds/{number}")
    for _ in range(6):
        report, requests = await poller.cycle()
        if lists(requests)[-1].endswith(f"/builds/{number}"):
            break
    else:
        pytest.fail("never fetched alone")
    # Its own trouble, not Buildkite's: no backoff.
    assert not report.failed and report.backoff == 0
    report, requests = await poller.cycle()
    if status == 404:  # gone from Buildkite: let go, nothing left to poll
        assert requests == [] and await poller.services.store.pending_count() == 0
    else:  # still followed, and polling goes on
        assert lists(requests)[:2] == ["finished", "active"] and not report.skipped
        assert await poller.services.store.pending_count() == 1


# -- backing off ------------------------------------------------------------------------------


async def test_a_poll_reads_past_a_build_it_cannot_read(
    poller: Poller, caplog: pytest.LogCaptureFixture
) -> None:
    numbers = await poller.track(2)
    await poller.cycle()
    odd = poller.bk.build(PIPELINE, numbers[0])
    poller.bk.set_build_state(PIPELINE, numbers[0], "passed")
    poller.bk.set_build_state(PIPELINE, numbers[1], "passed")
    odd["web_url"] = 42  # cannot be read: the build is skipped, not the whole list
    with caplog.at_level(logging.WARNING):
        report, _ = await poller.cycle()
    assert not report.failed and not report.backed_off
    assert await poller.phase(numbers[1]) == "passed"
    assert sum(odd["id"] in r.getMessage() for r in caplog.records) == 1


async def test_the_reserve_is_kept_of_the_token_users_budget_when_it_is_the_tighter(
    poller: Poller, caplog: pytest.LogCaptureFixture
) -> None:
    numbers = await poller.track(2)
    await poller.cycle()
    # The organization has plenty left; this token's own per-user budget (50 a minute on
    # Buildkite) has one request left.
    poller.bk.user_rate_limit = len(poller.bk.requests) + 1
    poller.bk.set_build_state(PIPELINE, numbers[0], "passed")
    with caplog.at_level(logging.WARNING, logger="app.tracking.poller"):
        report, requests = await poller.cycle()
    assert lists(requests) == ["finished"]
    assert report.backed_off == "rate_limit_low"
    assert 0 < report.backoff <= 60
    assert any("user requests left" in r.getMessage() for r in caplog.records)
    assert poller.bk.unexpected == []


async def test_low_rate_limit_remaining_defers_the_active_list_then_waits_for_the_reset(
    poller: Poller, caplog: pytest.LogCaptureFixture
) -> None:
    numbers = await poller.track(3)
    await poller.cycle()
    # Other users of the organisation's budget leave one request of it (the window is 60 s, and
    # the fake counts every request so far in it).
    poller.bk.rate_limit = len(poller.bk.requests) + 1
    poller.bk.set_build_state(PIPELINE, numbers[0], "passed")
    with caplog.at_level(logging.INFO, logger="app.tracking.poller"):
        report, requests = await poller.cycle()
        # The final states are still fetched; the active list waits for the budget.
        assert lists(requests) == ["finished"]
        assert await poller.phase(numbers[0]) == "passed"
        assert report.backed_off == "rate_limit_low"
        assert 0 < report.backoff <= 60  # until the rate-limit window resets

        # Nothing is asked of Buildkite until then.
        report, requests = await poller.cycle(report.backoff - 1)
        assert requests == [] and report.skipped and report.backoff == pytest.approx(1, abs=0.5)
        poller.bk.rate_limit = 10**6  # the window has reset
        poller.bk.set_build_state(PIPELINE, numbers[1], "passed")
        report, requests = await poller.cycle(1)
        assert lists(requests) == ["finished", "active"]
        assert report.backoff == 0 and not report.backed_off
        assert await poller.phase(numbers[1]) == "passed"
    messages = [r.getMessage() for r in caplog.records if r.name == "app.tracking.poller"]
    assert sum("Buildkite polling waits" in m for m in messages) == 1, messages
    assert sum("Buildkite polling resumed" in m for m in messages) == 1, messages
    assert (await poller.services.store.poll_state()).backoff == ""


@pytest.mark.parametrize("failure", ["429", "5xx", "connection"])
async def test_failures_back_off_doubling_up_to_a_cap_and_reset_on_success(
    poller: Poller, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    await poller.track(2)

    def fail(times: int) -> None:
        if failure == "429":
            poller.bk.rate_limit_next(times, reset=5)
        elif failure == "5xx":
            poller.bk.fail_next(times, 503)
        else:  # the connection is cut before the answer
            poller.bk.drop_response_next(times, "/builds")

    kind = {"429": "rate_limited", "5xx": "server_error", "connection": "unavailable"}[failure]
    waits = []
    with caplog.at_level(logging.INFO, logger="app.tracking.poller"):
        fail(7)
        report, requests = await poller.cycle()
        for _ in range(7):
            assert len(requests) == 1 and report.failed and report.backed_off == kind
            waits.append(report.backoff)
            # Until the wait is over, no request at all.
            skipped, none = await poller.cycle(report.backoff - 1)
            assert none == [] and skipped.skipped
            assert skipped.backoff == pytest.approx(1, abs=0.5)
            report, requests = await poller.cycle(1)
        # Recovered: a normal cycle, and the next failure starts from the shortest wait again.
        assert lists(requests) == ["finished", "active"] and not report.failed
        fail(1)
        report, _ = await poller.cycle()
    assert waits == [20, 40, 80, 160, 300, 300, 300]
    assert report.backoff == 20
    messages = [r.getMessage() for r in caplog.records if r.name == "app.tracking.poller"]
    assert sum("Buildkite polling waits" in m for m in messages) == 2, messages  # per backoff
    assert sum("Buildkite polling resumed" in m for m in messages) == 1, messages
    assert await poller.services.store.pending_count() == 2


async def test_builds_that_finish_while_buildkite_is_down_get_their_final_message(
    poller: Poller, slack: FakeSlack
) -> None:
    stop = asyncio.Event()
    notifier = asyncio.create_task(poller.services.notifier.run(stop))
    try:
        numbers = await poller.track(3)
        posted = await slack.wait_for(
            lambda: (
                (roots := [c for c in slack.posts(CHANNEL) if not c.args.get("thread_ts")])
                and len(roots) == 3
                and roots
            ),
            timeout=15,
        )
        assert posted
        roots = [c.response["ts"] for c in posted]
        await poller.cycle()
        # Buildkite answers 502 for five minutes (four cycles, backing off), meanwhile the
        # builds finish.
        poller.bk.fail_next(4, 502)
        for number in numbers:
            poller.bk.set_build_state(PIPELINE, number, "passed")
        report, _ = await poller.cycle()
        waited = 0.0
        while report.failed:
            assert await poller.services.store.pending_count() == 3
            waited += report.backoff
            report, _ = await poller.cycle(report.backoff)
        assert waited == 20 + 40 + 80 + 160
        assert await poller.services.store.pending_count() == 0

        def final(message: dict[str, Any]) -> bool:
            return "Passed" in json.dumps(message.get("blocks"))

        await slack.wait_for(
            lambda: all(final(slack.message(CHANNEL, ts)) for ts in roots), timeout=15
        )
    finally:
        stop.set()
        await notifier
        await poller.services.notifier.finish_writing(10.0)


def test_the_backoff_is_exported_as_metrics() -> None:
    metrics = Metrics()
    metrics.poll_cycle(PollReport(requests=1, failed=True, backoff=40, backed_off="unavailable"))
    metrics.poll_cycle(PollReport(skipped=True, backoff=30))
    registry = metrics.registry
    assert registry.get_sample_value("bkchatops_poll_backoff_seconds") == 30
    assert registry.get_sample_value("bkchatops_poll_cycles_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("bkchatops_poll_cycles_total", {"outcome": "waiting"}) == 1
    assert (
        registry.get_sample_value("bkchatops_poll_backoffs_total", {"reason": "unavailable"}) == 1
    )
    metrics.poll_cycle(PollReport(requests=2))
    assert registry.get_sample_value("bkchatops_poll_backoff_seconds") == 0
