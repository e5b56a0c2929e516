"""Build-health digests: the arithmetic (a pure function over a list of builds), reading a
window of builds within Buildkite's rate limit, and the per-channel schedules that post them.

Definitions, stated in every digest: the pass rate is passed / (passed + failed); a duration runs
from a build's start to its finish, over passed and failed builds; the median and the 95th
percentile are by nearest rank (the value at rank ceil(p/100 * n) of the n sorted durations, so
the median of an even count is the lower middle value); a build is flaky when it passed although
one of its jobs had been retried, i.e. a failure that passed on a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import redis.asyncio as redis
from redis.exceptions import RedisError

from app.settings import DigestSchedule
from app.slack.outbox import SlackDeliveryError
from app.slack.render.digest import Digest, PipelineHealth, health_digest
from app.storage.keys import (
    DIGEST_LAST_KEY,
    DIGEST_LAST_TTL,
    DIGEST_LEASE_KEY,
    DIGEST_LEASE_TTL,
)
from buildkite.client import BuildkiteClient
from buildkite.models import Build, BuildState

if TYPE_CHECKING:
    from app.core.services import Services

log = logging.getLogger(__name__)

WINDOWS: dict[str, timedelta] = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}
PER_PAGE = 100
#: At most this many builds are read per pipeline listed (or for the whole organisation): 20
#: pages, plus as many again for the passed builds' jobs, keeps a digest under Buildkite's
#: 200 requests per minute with room for everything else.
MAX_BUILDS = 2000
TOP_FAILING = 3

#: A digest posted more than this long after its slot says that it is late.
LATE_AFTER = timedelta(minutes=10)
TICK = 30.0

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# Records the slot as posted unless a later one already was (slots only move forward).
_MARK_POSTED = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
"""


# -- the arithmetic (pure) ------------------------------------------------------------------


def nearest_rank(sorted_values: Sequence[int], percent: float) -> int | None:
    """The nearest-rank percentile: the value at rank ceil(percent/100 * n), 1-based."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def build_seconds(build: Build) -> int | None:
    """How long a passed or failed build ran, start to finish; None for the others."""
    if build.state not in {BuildState.PASSED, BuildState.FAILED} or build.finished_at is None:
        return None
    start = build.started_at or build.created_at
    if start is None:
        return None
    return max(0, round((build.finished_at - start).total_seconds()))


def passed_after_retry(build: Build) -> bool:
    """A passed build in which some job had been retried: the flaky signal."""
    return build.state is BuildState.PASSED and any(
        job.retried or (job.retries_count or 0) > 0 for job in build.jobs
    )


def pipeline_health(slug: str, builds: Sequence[Build], *, jobs_checked: bool) -> PipelineHealth:
    passed = sum(1 for b in builds if b.state is BuildState.PASSED)
    failed = sum(1 for b in builds if b.state is BuildState.FAILED)
    durations = sorted(s for s in map(build_seconds, builds) if s is not None)
    flaky = [b for b in builds if passed_after_retry(b)] if jobs_checked else []
    return PipelineHealth(
        slug=slug,
        builds=len(builds),
        passed=passed,
        failed=failed,
        pass_rate=passed / (passed + failed) if passed + failed else None,
        median=nearest_rank(durations, 50),
        p95=nearest_rank(durations, 95),
        flaky=len(flaky),
        flaky_urls=tuple(b.web_url for b in flaky),
    )


def compute_digest(
    builds: Iterable[Build],
    *,
    scope: str,
    window: str,
    until: datetime,
    requests: int,
    jobs_read: int | None,
    capped: bool = False,
) -> Digest:
    """The digest of the builds created in the `window` before `until` (others are ignored).

    `jobs_read` is how many passed builds were read with their jobs (None: jobs were not read,
    so the flaky signal is not computed).
    """
    read = list(builds)
    since = until - WINDOWS[window]
    by_pipeline: dict[str, list[Build]] = defaultdict(list)
    for build in read:
        created = build.created_at
        if created is not None and not since <= created <= until:
            continue
        by_pipeline[build.pipeline_slug or "?"].append(build)
    rows = tuple(
        pipeline_health(slug, builds_of, jobs_checked=jobs_read is not None)
        for slug, builds_of in sorted(by_pipeline.items())
    )
    failing = sorted(
        (row for row in rows if row.failed),
        key=lambda row: (-row.failed, row.pass_rate if row.pass_rate is not None else 1, row.slug),
    )
    flaky = sorted((row for row in rows if row.flaky), key=lambda row: (-row.flaky, row.slug))
    return Digest(
        scope=scope,
        window=window,
        since=since,
        until=until,
        pipelines=rows,
        top_failing=tuple(failing[:TOP_FAILING]),
        flaky=tuple(flaky),
        builds_read=len(read),
        requests=requests,
        jobs_read=jobs_read,
        capped=capped,
    )


# -- reading builds ---------------------------------------------------------------------------


def _pages(read: int) -> int:
    return max(1, math.ceil(read / PER_PAGE))


async def build_health(
    bk: BuildkiteClient,
    *,
    pipelines: Literal["all"] | Sequence[str],
    window: str,
    until: datetime | None = None,
    retries: bool = True,
) -> Digest:
    """Read the window's builds and compute their digest.

    Per pipeline named (or once for the whole organisation): the builds without their jobs,
    100 per page; then, with `retries`, the passed builds again with all their jobs (retried
    ones included), 100 per page, to spot the flaky ones. Each listing stops at MAX_BUILDS.
    """
    until = until or datetime.now(UTC)
    since = until - WINDOWS[window]
    targets: list[str | None] = [None] if pipelines == "all" else list(pipelines)
    builds: list[Build] = []
    requests = 0
    jobs_read = 0
    capped = False
    for target in targets:
        listed = [
            build
            async for build in bk.list_builds(
                pipeline=target,
                created_from=since,
                exclude_jobs=True,
                per_page=PER_PAGE,
                limit=MAX_BUILDS + 1,
            )
        ]
        requests += _pages(len(listed))
        capped = capped or len(listed) > MAX_BUILDS
        listed = listed[:MAX_BUILDS]
        if retries and any(build.state is BuildState.PASSED for build in listed):
            passed = [
                build
                async for build in bk.list_builds(
                    pipeline=target,
                    created_from=since,
                    state=BuildState.PASSED,
                    include_retried_jobs=True,
                    per_page=PER_PAGE,
                    limit=MAX_BUILDS,
                )
            ]
            requests += _pages(len(passed))
            jobs_read += len(passed)
            with_jobs = {build.id: build for build in passed}
            listed = [with_jobs.get(build.id, build) for build in listed]
        builds += listed
    scope = "all" if pipelines == "all" else ", ".join(pipelines)
    return compute_digest(
        builds,
        scope=scope,
        window=window,
        until=until,
        requests=requests,
        jobs_read=jobs_read if retries else None,
        capped=capped,
    )


# -- schedules ----------------------------------------------------------------------------------


def latest_slot(schedule: DigestSchedule, now: datetime) -> datetime:
    """The schedule's most recent time (UTC) at or before `now`."""
    hour, minute = (int(part) for part in schedule.at.split(":"))
    now = now.astimezone(UTC)
    slot = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if schedule.weekday is None:
        return slot if slot <= now else slot - timedelta(days=1)
    slot -= timedelta(days=(now.weekday() - _WEEKDAYS.index(schedule.weekday)) % 7)
    return slot if slot <= now else slot - timedelta(days=7)


class DigestLedger:
    """The schedules' records in Redis: who posts a slot (a lease) and the last slot posted."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._mark = client.register_script(_MARK_POSTED)

    async def last_posted(self, schedule: str) -> float | None:
        value = await self.redis.get(DIGEST_LAST_KEY.format(schedule=schedule))
        return float(value) if value is not None else None

    async def claim(self, schedule: str, slot: datetime, owner: str) -> bool:
        """Take a slot for this process; False when another process has it."""
        key = DIGEST_LEASE_KEY.format(schedule=schedule, slot=int(slot.timestamp()))
        return bool(await self.redis.set(key, owner, nx=True, ex=DIGEST_LEASE_TTL))

    async def mark_posted(self, schedule: str, slot: datetime) -> None:
        key = DIGEST_LAST_KEY.format(schedule=schedule)
        await self._mark(keys=[key], args=[int(slot.timestamp()), DIGEST_LAST_TTL])


async def post_due_digest(
    services: Services,
    ledger: DigestLedger,
    schedule: DigestSchedule,
    *,
    now: datetime,
    owner: str,
) -> bool:
    """Post the schedule's most recent slot if nobody has: once, even with several processes.

    A slot missed while the bot was down is posted late, once; older missed slots are not.
    """
    slot = latest_slot(schedule, now)
    last = await ledger.last_posted(schedule.key)
    if last is not None and last >= slot.timestamp():
        return False
    if not await ledger.claim(schedule.key, slot, owner):
        return False
    digest = await build_health(
        services.buildkite, pipelines=schedule.pipelines, window=schedule.window, until=slot
    )
    if now - slot > LATE_AFTER:
        digest = replace(digest, late_for=slot)
    await services.outbox.post(
        schedule.channel,
        health_digest(digest),
        key=f"digest:{schedule.key}:{int(slot.timestamp())}",
    )
    await ledger.mark_posted(schedule.key, slot)
    log.info("posted the %s digest of %s to %s", slot.isoformat(), digest.scope, schedule.channel)
    return True


async def run_digest_schedules(
    services: Services,
    stop: asyncio.Event,
    *,
    tick: float = TICK,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Post each scheduled digest when its slot comes (or late, after downtime) until `stop`.

    A failed digest is tried again once its lease expires (DIGEST_LEASE_TTL).
    """
    schedules = services.settings.digest_schedules
    if not schedules:
        return
    ledger = DigestLedger(services.redis)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    while not stop.is_set():
        for schedule in schedules:
            try:
                await post_due_digest(services, ledger, schedule, now=clock(), owner=owner)
                services.redis_outage.recovered()
            except (RedisError, OSError) as exc:
                services.redis_outage.failed(exc, "the digest schedule")
            except SlackDeliveryError as exc:
                # The outbox logged the cause and its fix once for this channel; a permanent
                # one (the bot not invited, say) is not worth a traceback per attempt.
                log.log(
                    logging.INFO if exc.permanent else logging.WARNING,
                    "the digest for %s was not posted (%s); it is tried again in %d min",
                    schedule.channel,
                    exc.error,
                    DIGEST_LEASE_TTL // 60,
                )
            except Exception:
                log.exception(
                    "the digest for %s failed; it is tried again in %d min",
                    schedule.channel,
                    DIGEST_LEASE_TTL // 60,
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=tick)
