"""The polling fallback: org-wide lists of the bot's own builds, fed to `Intake.observe`.

One process per interval polls, across all replicas (a lease in Redis). It adopts the builds
asked for without an answer, stays within a share of Buildkite's rate limit, and backs off
while Buildkite fails; pending builds stay in Redis meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.exceptions import RedisError

from app.ops.metrics import UNWIRED, Metrics
from app.ops.outages import RedisOutage
from app.storage.records import PollState
from app.storage.store import Store
from app.tracking.intake import Intake
from app.tracking.phases import process_name
from app.tuning import TrackingTuning
from buildkite.client import SOURCE_META_KEY, SOURCE_META_VALUE, BuildkiteClient, RateLimitBudget
from buildkite.errors import (
    BuildkiteError,
    BuildkiteUnavailable,
    NotFound,
    RateLimited,
    ServerError,
)
from buildkite.models import ACTIVE_STATES, Build

log = logging.getLogger(__name__)


@dataclass
class PollReport:
    """What one poll cycle did (counted by app.ops.metrics)."""

    #: Buildkite requests made (pages of lists, single builds).
    requests: int = 0
    observed: int = 0
    changed: int = 0
    #: Nothing done: another process polled, or the poller is backing off (see `backoff`).
    skipped: bool = False
    #: The cycle failed on a Buildkite error.
    failed: bool = False
    #: Seconds before the next poll may run, while backing off (0 otherwise).
    backoff: float = 0.0
    #: Why this cycle started or extended a backoff (rate_limit_low, rate_limited, ...).
    backed_off: str = ""


class Poller:
    """Polls Buildkite for the pending builds' states at a fixed rate, within its budgets."""

    def __init__(
        self,
        store: Store,
        buildkite: BuildkiteClient,
        intake: Intake,
        tuning: TrackingTuning,
        *,
        poll_interval: float = 10.0,
        metrics: Metrics = UNWIRED,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        redis_outage: RedisOutage | None = None,
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.intake = intake
        self.tuning = tuning
        self.poll_interval = poll_interval
        self.metrics = metrics
        self.consumer = consumer or process_name()
        self.clock = clock
        self.redis_outage = redis_outage or RedisOutage()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll at a fixed rate: cycles start every interval, whatever each one takes."""
        scheduled = self.clock()
        while not stop.is_set():
            try:
                self.metrics.poll_cycle(await self.poll_once())
                self.redis_outage.recovered()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self.redis_outage.failed(exc, "polling")
                self.metrics.poll_cycle(None)
            except Exception:
                log.exception("poll cycle failed; retrying next interval")
                self.metrics.poll_cycle(None)
            now = self.clock()
            scheduled = next_poll_at(scheduled, now, self.poll_interval)
            # Bounded, should the wall clock jump back.
            wait = min(max(scheduled - now, 0.0), self.poll_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)

    async def poll_once(self) -> PollReport:
        """One poll cycle, done by one process per interval across all replicas.

        Org-wide lists filtered to the bot's own builds cover every pending build. The builds
        finished since the last cycle, which carry the final states, are listed first and every
        cycle; the active ones (running, failing, blocked) only when due, spaced out so that the
        list costs at most `active_pages_per_minute`. Builds neither list mentions for a while
        (say, a rebuild started outside the bot) are fetched one by one, a few at a time.

        When Buildkite fails, or its rate limit runs low, the poller waits (see `_back_off`);
        pending builds stay pending, and the next cycle lists every build finished meanwhile.
        """
        report = PollReport()
        now = self.clock()
        if await self.store.pending_count() == 0 and not await self.store.awaited_count(due_by=now):
            return report
        state = await self.store.poll_state()
        if state.resume_at is not None and now < state.resume_at:
            report.skipped, report.backoff = True, state.resume_at - now
            return report
        lease_ms = int(self.poll_interval * 1000 * 0.9)
        if not await self.store.acquire_poll_lease(self.consumer, max(lease_ms, 100)):
            report.skipped = True
            return report
        try:
            await self._poll(report, state, now)
        except BuildkiteError as exc:
            report.failed = True
            failures = state.failures + 1
            wait = min(self.poll_interval * 2**failures, self.tuning.max_poll_backoff)
            if isinstance(exc, RateLimited) and exc.reset is not None:
                wait = max(wait, exc.reset)
            await self._back_off(report, state, _failure_kind(exc), wait, failures, str(exc))
            return report
        if (wait := self._rate_limit_wait()) is not None:
            budget = self._rate_limit_budget_low()
            assert budget is not None
            why = f"{budget.remaining} of {budget.limit} {budget.scope} requests left"
            await self._back_off(report, state, "rate_limit_low", wait, 0, why)
        elif state.backoff:
            await self.store.end_poll_backoff()
            log.info("Buildkite polling resumed after backing off (%s)", state.backoff)
        return report

    async def _poll(self, report: PollReport, state: PollState, now: float) -> None:
        await self._adopt_awaited(report, now)
        pending = set(await self.store.pending())
        mine = {SOURCE_META_KEY: SOURCE_META_VALUE}
        since = state.finished_from if state.finished_from is not None else now - 3600
        finished = self.buildkite.list_builds(
            meta_data=mine,
            finished_from=datetime.fromtimestamp(since, tz=UTC),
            exclude_jobs=True,
            per_page=100,
        )
        newest = await self._observe_listed(finished, pending, report)
        # Buildkite's own clock, when it reported a finish, bounds the next list more tightly
        # than ours with its allowance for skew: at 100 finishes a minute, one page, not three.
        finished_from = now - self.tuning.finished_overlap
        if newest is not None:
            finished_from = max(finished_from, newest - self.tuning.finished_settle)
        await self.store.save_poll_state(finished_from=finished_from)

        # Give or take a little, so that a cycle that starts a moment early is not skipped.
        due = state.active_due is None or now >= state.active_due - self.poll_interval / 10
        if not due or self._rate_limit_wait() is not None:
            return
        before = report.requests
        active = self.buildkite.list_builds(
            meta_data=mine, state=list(ACTIVE_STATES), exclude_jobs=True, per_page=100
        )
        await self._observe_listed(active, pending, report)
        pages = report.requests - before
        spacing = max(self.poll_interval, pages * 60 / self.tuning.active_pages_per_minute)
        await self.store.save_poll_state(active_at=now, active_due=now + spacing)

        stale_before = now - self.tuning.stale_after_intervals * self.poll_interval
        if state.active_at is not None:  # not seen by the last two lists of active builds
            stale_before = min(stale_before, state.active_at)
        for build_id in await self.store.pending(
            seen_before=stale_before, limit=self.tuning.max_single_fetches
        ):
            tracked = await self.store.get(build_id)
            if tracked is None:
                await self.store.forget_pending(build_id)
                continue
            if self._rate_limit_wait() is not None:
                return
            report.requests += 1
            try:
                build = await self.buildkite.get_build(tracked.pipeline, tracked.number)
            except NotFound:
                log.warning(
                    "%s #%s no longer exists; not following it", tracked.pipeline, tracked.number
                )
                await self.store.forget_pending(build_id)
                continue
            except (RateLimited, ServerError, BuildkiteUnavailable):
                raise  # Buildkite's trouble, not this build's: the poller backs off
            except BuildkiteError as exc:
                log.warning("poll of %s #%s failed: %s", tracked.pipeline, tracked.number, exc)
                continue
            report.observed += 1
            if await self.intake.observe(build) is not None:
                report.changed += 1

    async def _adopt_awaited(self, report: PollReport, now: float) -> None:
        """Look for the builds asked for without an answer, and follow each one that appeared
        in its requester's channel: tracked first, then taken, so that a crash in between
        leaves it to be adopted again, and `track` gives it one message whoever adopts it."""
        for awaited in await self.store.awaited_due(now, limit=self.tuning.max_single_fetches):
            if now > awaited.until:
                if await self.store.take_awaited(awaited.request_id):
                    log.warning(
                        "gave up waiting for the build asked for by request %s on %s",
                        awaited.request_id,
                        awaited.pipeline,
                    )
                continue
            if self._rate_limit_wait() is not None:
                return
            report.requests += 1
            try:
                if awaited.rebuild_of is None:
                    build = await self.buildkite.find_created_build(
                        awaited.pipeline, awaited.request_id
                    )
                else:
                    build = await self.buildkite.find_rebuild(
                        awaited.pipeline,
                        awaited.rebuild_of,
                        since=datetime.fromtimestamp(awaited.sent_at, tz=UTC),
                    )
            except (RateLimited, ServerError, BuildkiteUnavailable):
                raise  # Buildkite's trouble: the poller backs off
            except BuildkiteError as exc:
                log.warning("looking for request %s failed: %s", awaited.request_id, exc)
                continue
            if build is None:
                continue
            target = awaited.target
            await self.intake.track(
                build,
                pipeline=awaited.pipeline,
                channel=target.channel,
                requester=target.requester,
                thread_ts=target.thread_ts,
                notify_url=target.notify_url,
            )
            report.observed += 1
            if await self.store.take_awaited(awaited.request_id):
                log.info(
                    "adopted %s #%s, asked for by request %s without an answer",
                    awaited.pipeline,
                    build.number,
                    awaited.request_id,
                )

    async def _observe_listed(
        self, builds: AsyncIterator[Build], pending: set[str], report: PollReport
    ) -> float | None:
        """Observe the pending builds of a list; returns the newest finish time listed."""
        listed = 0
        newest: float | None = None
        async for build in builds:
            listed += 1
            if (moment := build.finished_at) is not None:
                finished = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
                newest = finished if newest is None else max(newest, finished)
            if build.id in pending:
                report.observed += 1
                if await self.intake.observe(build) is not None:
                    report.changed += 1
        report.requests += max(1, math.ceil(listed / 100))  # pages of 100
        return newest

    def _rate_limit_budget_low(self) -> RateLimitBudget | None:
        """The rate-limit scope (organization or token user) below its reserve, if any: the
        tighter budget is the one that runs out first."""
        low = [
            budget
            for budget in self.buildkite.rate_limits.values()
            if budget.remaining is not None
            and budget.limit
            and budget.remaining < budget.limit * self.tuning.rate_limit_reserve
        ]
        return min(low, key=lambda b: (b.remaining or 0) / (b.limit or 1), default=None)

    def _rate_limit_wait(self) -> float | None:
        """Seconds until Buildkite's rate-limit window resets, when little of it is left."""
        budget = self._rate_limit_budget_low()
        if budget is None:
            return None
        return max(budget.reset, 0.0) if budget.reset is not None else self.poll_interval

    async def _back_off(
        self, report: PollReport, state: PollState, kind: str, wait: float, failures: int, why: str
    ) -> None:
        """No process polls for `wait` seconds; logged when a backoff begins, not every cycle."""
        report.backoff, report.backed_off = wait, kind
        now = self.clock()
        await self.store.save_poll_state(resume_at=now + wait, failures=failures, backoff=kind)
        if kind != state.backoff:
            log.warning(
                "Buildkite polling waits %.0f s (%s: %s); pending builds are kept, and polling "
                "backs off further while this lasts",
                wait,
                kind,
                why,
            )
        else:
            log.debug("Buildkite polling waits %.0f s more (%s, %d in a row)", wait, kind, failures)


def next_poll_at(scheduled: float, now: float, interval: float) -> float:
    """The next start of a fixed-rate schedule: `scheduled` plus whole intervals, not before now.

    A cycle that overran the next start skips it, rather than two cycles running back to back.
    """
    return scheduled + max(1, math.ceil((now - scheduled) / interval)) * interval


def _failure_kind(exc: BuildkiteError) -> str:
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, ServerError):
        return "server_error"
    if isinstance(exc, BuildkiteUnavailable):
        return "unavailable"
    return "error"
