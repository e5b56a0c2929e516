"""Following builds to their final state: one `observe` for every source, a notifier, a poller.

Build state arrives three ways (our own API calls, webhooks, polls). All of them go through
`Tracker.observe`, whose atomic compare-and-set in Redis lets exactly one observer emit each
transition. Transitions are queued in a Redis stream and turned into Slack writes by
`Tracker.run_notifier`, so a transition seen just before a crash is still posted after a restart,
by this process or another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.exceptions import RedisError, ResponseError

from app.ops.metrics import UNWIRED, Metrics
from app.settings import DEFAULT_SLACK_HOOKS_URL
from app.slack.directory import Directory
from app.slack.mrkdwn import link
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render.builds import (
    BlockStep,
    LogTail,
    build_message,
    failing_reply,
    final_reply,
    running_reply,
)
from app.slack.render.common import Rendered
from app.slack.response_urls import SlackHooks
from app.storage.store import (
    FINAL_RANK,
    LOCK_TTL_MS,
    REGRESSED,
    MessageTarget,
    PollState,
    Store,
    TrackedBuild,
    Transition,
)
from buildkite.client import SOURCE_META_KEY, SOURCE_META_VALUE, BuildkiteClient, RateLimitBudget
from buildkite.errors import (
    BuildkiteError,
    BuildkiteUnavailable,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
)
from buildkite.models import ACTIVE_STATES, Build, BuildState, Job

log = logging.getLogger(__name__)

_SNAPSHOT_FIELDS = {
    "id",
    "source",
    "author",
    "creator",
    "number",
    "state",
    "blocked",
    "web_url",
    "message",
    "commit",
    "branch",
    "created_at",
    "started_at",
    "finished_at",
}

#: How long a transition may stay unfinished by its reader before another process takes it.
#: Longer than a build lock, which its holder renews while it writes.
RECLAIM_IDLE_MS = 2 * LOCK_TTL_MS
#: How many builds' Slack writes may be in flight at once in one process.
MAX_PARALLEL_WRITES = 64
#: A transition handed out this many times without success is set aside (and logged).
MAX_DELIVERIES = 8
#: Consumers of the events group left by stopped processes (each process reads under a new
#: name) are forgotten once idle this long with nothing pending; checked this often (seconds).
DEAD_CONSUMER_IDLE_MS = 24 * 3600 * 1000
PRUNE_CONSUMERS_EVERY = 3600.0
#: A pending build not seen by the org-wide lists for this many poll intervals, nor by the last
#: two lists of active builds, is fetched alone.
STALE_AFTER_INTERVALS = 4
#: At most this many single-build fetches per list of active builds, to stay within the budget.
MAX_SINGLE_FETCHES = 10
#: Overlap of the `finished_from` window, for clock skew between us and Buildkite.
FINISHED_OVERLAP = 120.0
#: The next list of finished builds starts this long before the newest finish Buildkite reported
#: (on its own clock), for builds that had finished but were not listed yet.
FINISHED_SETTLE = 30.0
#: The list of active builds (10 pages at 1,000 builds) is spaced out so that it costs at most
#: this many requests a minute: every cycle for a few builds, once a minute for 1,000.
ACTIVE_PAGES_PER_MINUTE = 10
#: The poller leaves this share of Buildkite's rate limit to commands: below it, it waits for the
#: rate-limit window to reset.
RATE_LIMIT_RESERVE = 0.2
#: The longest wait after failed cycles; the wait doubles from two intervals up to it.
MAX_POLL_BACKOFF = 300.0
#: How long a Slack post already made is retried to be recorded through a Redis outage: left
#: unrecorded, it would be posted again. Shorter than a build lock, which stays ours meanwhile.
RECORD_PATIENCE = LOCK_TTL_MS / 2000

_RANKS = {
    BuildState.CREATING: 1,
    BuildState.SCHEDULED: 1,
    BuildState.RUNNING: 2,
    BuildState.FAILING: 3,
    BuildState.CANCELING: 5,
}
_BLOCKED_RANK = 4


def phase_of(build: Build) -> tuple[str, int]:
    """A build's phase (its state, marked when on a block step) and its rank in a build's life."""
    if build.is_final:
        return build.state.value, FINAL_RANK
    if build.is_waiting_on_block:
        return f"{build.state.value}:blocked", _BLOCKED_RANK
    return build.state.value, _RANKS.get(build.state, 2)


def reply_kind(phase: str) -> str | None:
    """Which thread reply a phase deserves: the thread only hears of running, failing, final."""
    if phase == BuildState.RUNNING.value:
        return "running"
    if phase == BuildState.FAILING.value:
        return "failing"
    if phase in {s.value for s in BuildState if s.is_terminal}:
        return "final"
    return None


def snapshot(build: Build) -> dict[str, object]:
    return build.model_dump(mode="json", include=_SNAPSHOT_FIELDS)


@dataclass
class PollReport:
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


class Tracker:
    """Follows the builds the bot started and writes their messages."""

    #: Where this tracker counts; app.main wires in the process's metrics.
    metrics: Metrics = UNWIRED
    #: Retries a failed build's jobs when its pipeline opted in (wired by app.main).
    auto_retry: Callable[[TrackedBuild, Build], Awaitable[None]] | None = None

    def __init__(
        self,
        store: Store,
        buildkite: BuildkiteClient,
        outbox: Outbox,
        *,
        poll_interval: float = 10.0,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        people: Directory | None = None,
        hooks: SlackHooks | None = None,
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.outbox = outbox
        #: The only way to a requester's response_url (see app.slack.response_urls).
        self.hooks = hooks or SlackHooks(DEFAULT_SLACK_HOOKS_URL, outbox, UNWIRED)
        self.poll_interval = poll_interval
        self.people = people
        #: Slack writes in flight, at most MAX_PARALLEL_WRITES at once, in order per build.
        self._slots = asyncio.Semaphore(MAX_PARALLEL_WRITES)
        self._writing: set[asyncio.Task[None]] = set()
        #: Per build: the lock that keeps its writes in order, and how many tasks use it.
        self._build_order: dict[str, tuple[asyncio.Lock, int]] = {}
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = clock

    # -- the one way in ---------------------------------------------------------------------

    async def track(
        self,
        build: Build,
        *,
        pipeline: str,
        channel: str,
        requester: str | None,
        thread_ts: str | None = None,
        notify_url: str | None = None,
        route: str | None = None,
    ) -> bool:
        """Follow a build with a message in `channel` (posted by the notifier).

        False when that channel already has a message about the build: never two per channel.
        """
        phase, rank = phase_of(build)
        target = MessageTarget(
            channel=channel,
            requester=requester,
            thread_ts=thread_ts,
            notify_url=notify_url,
            route=route,
        )
        return await self.store.track(
            build.id,
            pipeline=pipeline,
            number=build.number,
            target=target,
            phase=phase,
            rank=rank,
            snapshot=snapshot(build),
            final=build.is_final,
        )

    async def reopen(self, build: Build) -> None:
        """The bot retried this finished build's jobs: follow it again, replies re-armed."""
        await self.store.mark_retried(build.id)
        await self.store.reset(build.id, new_generation=True)
        await self.observe(build, confirmed=True)

    async def observe(self, build: Build, *, confirmed: bool = False) -> str | None:
        """Feed a build seen anywhere; returns the previous phase if this call changed it.

        A build that seems to have gone back (it left a block step, or a finished build's jobs
        were retried) is checked against Buildkite once before its message follows it back, so
        a late, out-of-order webhook cannot undo a newer state.
        """
        phase, rank = phase_of(build)
        result = await self.store.observe(
            build.id,
            phase=phase,
            rank=rank,
            snapshot=snapshot(build),
            final=build.is_final,
            blocked=build.is_waiting_on_block and not build.is_final,
            now=self.clock(),
        )
        if result != REGRESSED:
            return result
        if confirmed:
            return None
        tracked = await self.store.get(build.id)
        if tracked is None:
            return None
        try:
            fresh = await self.buildkite.get_build(tracked.pipeline, tracked.number)
        except BuildkiteError as exc:
            log.warning("could not confirm %s #%s: %s", tracked.pipeline, tracked.number, exc)
            return None
        fresh_phase, fresh_rank = phase_of(fresh)
        if fresh_phase == tracked.phase or fresh_rank >= _rank_of(tracked):
            return await self.observe(fresh, confirmed=True)
        was_final = tracked.phase in {s.value for s in BuildState if s.is_terminal}
        await self.store.reset(build.id, new_generation=was_final)
        return await self.observe(fresh, confirmed=True)

    # -- transitions to Slack ---------------------------------------------------------------

    async def run_notifier(self, stop: asyncio.Event) -> None:
        group_ready = False
        last_reclaim = 0.0
        last_prune = float("-inf")  # first at start
        while not stop.is_set():
            try:
                if not group_ready:
                    await self.store.ensure_group()
                    group_ready = True
                batch = await self.store.read_transitions(self.consumer, block_ms=200)
                if time.monotonic() - last_reclaim > RECLAIM_IDLE_MS / 3000:
                    last_reclaim = time.monotonic()
                    batch += await self._reclaim()
                if time.monotonic() - last_prune > PRUNE_CONSUMERS_EVERY:
                    last_prune = time.monotonic()
                    gone = await self.store.forget_idle_consumers(
                        self.consumer, idle_ms=DEAD_CONSUMER_IDLE_MS
                    )
                    if gone:
                        log.info("forgot %d stopped processes' stream consumers", len(gone))
                for transition in batch:
                    if stop.is_set():
                        break  # left unacknowledged: taken over after a restart
                    await self._start(transition)
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis lost the stream (restart without persistence)
                    group_ready = False
                    continue
                log.exception("notifier cycle failed; retrying")
                await asyncio.sleep(1.0)
            except (RedisError, OSError) as exc:
                # Redis is down: /readyz says so; a traceback every second would not help.
                log.warning("notifier waiting, redis unavailable: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("notifier cycle failed; retrying")
                await asyncio.sleep(1.0)

    async def _start(self, transition: Transition) -> None:
        """Hand a transition to its own task: builds are written in parallel (one slow or paced
        Slack call holds up only its build), each build's transitions in order."""
        await self._slots.acquire()
        task = asyncio.create_task(self._in_order(transition))
        self._writing.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._writing.discard(finished)
            self._slots.release()

        task.add_done_callback(done)

    async def _in_order(self, transition: Transition) -> None:
        build_id = transition.build_id
        lock, users = self._build_order.get(build_id, (asyncio.Lock(), 0))
        self._build_order[build_id] = (lock, users + 1)
        try:
            async with lock:
                await self._process_safely(transition)
        finally:
            # Forgotten only by its last user: a released lock may have a waiter not yet woken.
            lock, users = self._build_order[build_id]
            if users > 1:
                self._build_order[build_id] = (lock, users - 1)
            else:
                del self._build_order[build_id]

    async def finish_writing(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (bounded) for the Slack writes in flight; the rest is taken over later."""
        if self._writing:
            await asyncio.wait(set(self._writing), timeout=timeout)

    async def _reclaim(self) -> list[Transition]:
        taken = []
        for transition in await self.store.reclaim_transitions(
            self.consumer, min_idle_ms=RECLAIM_IDLE_MS
        ):
            if await self.store.delivery_count(transition.entry_id) > MAX_DELIVERIES:
                log.error(
                    "giving up on %s -> %s of build %s after %d attempts",
                    transition.old,
                    transition.new,
                    transition.build_id,
                    MAX_DELIVERIES,
                )
                await self.store.ack_transition(transition.entry_id)
                continue
            taken.append(transition)
        return taken

    async def _process_safely(self, transition: Transition) -> None:
        try:
            await self.process(transition)
        except (TimeoutError, RedisError, BuildkiteError, OSError) as exc:
            log.warning("transition of build %s not written yet: %s", transition.build_id, exc)
        except Exception:
            log.exception("transition of build %s failed", transition.build_id)

    async def process(self, transition: Transition) -> bool:
        """Write what one transition implies to Slack; True once it is done (and acknowledged)."""
        async with self._locked(transition.build_id) as held:
            if not held:
                return False  # another process is on it; the entry is reclaimed if it dies
            tracked = await self.store.get(transition.build_id)
            if tracked is None:
                await self.store.ack_transition(transition.entry_id)
                return True
            try:
                await self._write(tracked, transition)
            except SlackDeliveryError as exc:
                if not exc.permanent:
                    return False  # left unacknowledged: retried after RECLAIM_IDLE_MS
            await self.store.ack_transition(transition.entry_id)
            self.metrics.build_transition(transition.old, transition.new)
            return True

    @contextlib.asynccontextmanager
    async def _locked(self, build_id: str, wait: float = 5.0) -> AsyncIterator[bool]:
        """Hold the build's lock (renewed while held), or yield False if it stays taken."""
        deadline = time.monotonic() + wait
        token = await self.store.acquire_lock(build_id)
        while token is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            token = await self.store.acquire_lock(build_id)
        if token is None:
            yield False
            return

        holding = True

        async def renew() -> None:
            # Until told to stop, not only until cancelled: redis-py can lose a cancellation that
            # lands during a command (the command returns), and this loop would renew forever.
            while holding:
                await asyncio.sleep(LOCK_TTL_MS / 3000)
                # A Redis outage must not end the renewals: the lock is needed again after it.
                with contextlib.suppress(RedisError, OSError):
                    if holding:
                        await self.store.renew_lock(build_id, token)

        renewer = asyncio.create_task(renew())
        try:
            yield True
        finally:
            holding = False
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self.store.release_lock(build_id, token)

    async def _write(self, tracked: TrackedBuild, transition: Transition) -> None:
        """Bring every concerned channel's message up to date, and add its thread reply."""
        build = Build.model_validate(tracked.snapshot)
        details = _Details(self, tracked, build)
        if transition.new.endswith(":blocked") and transition.new == tracked.phase:
            details.block = await self._block_step(tracked)
        retry_later: SlackDeliveryError | None = None
        for target in tracked.targets:
            if transition.channel not in (None, target.channel):
                continue
            try:
                await self._write_target(tracked, build, target, transition, details)
            except SlackDeliveryError as exc:
                if not exc.permanent:
                    retry_later = retry_later or exc  # the others still get theirs now
        if retry_later is not None:
            raise retry_later
        if transition.channel is None and transition.gen == tracked.gen:
            await self._after_final(tracked, build, transition)

    async def _write_target(
        self,
        tracked: TrackedBuild,
        build: Build,
        target: MessageTarget,
        transition: Transition,
        details: _Details,
    ) -> None:
        await self._write_root(tracked, build, target, details)
        kind = reply_kind(transition.new)
        if kind is None or transition.gen != tracked.gen or target.ts is None:
            return
        # A running or failing reply already overtaken by a later state stays out of the thread.
        if kind != "final" and transition.new != tracked.phase:
            return
        if await self.store.was_posted(tracked.build_id, target.channel, tracked.gen, kind):
            return
        reply, broadcast = await self._reply(kind, tracked, build, target, details)
        key = f"{tracked.build_id}:{target.channel}:{tracked.gen}:{kind}"
        try:
            await self._post_once(
                key, target.channel, reply, thread_ts=target.reply_thread, broadcast=broadcast
            )
        except SlackDeliveryError as exc:
            if exc.permanent:  # it will never be made: nothing to look for next time
                await self._forget_attempt(key)
            raise
        await self._record(
            lambda: self.store.mark_posted(tracked.build_id, target.channel, tracked.gen, kind)
        )
        await self._forget_attempt(key)

    async def _write_root(
        self, tracked: TrackedBuild, build: Build, target: MessageTarget, details: _Details
    ) -> None:
        """Post the build's message in one channel, or bring it up to date; a deleted one is
        posted again."""
        root = build_message(
            tracked.pipeline,
            build,
            target.requester,
            block=details.block if tracked.phase.endswith(":blocked") else None,
        )
        digest = root.digest()
        if target.ts is not None and digest != target.rendered:
            try:
                await self.outbox.update(target.channel, target.ts, root)
            except SlackDeliveryError as exc:
                if exc.error != "message_not_found":
                    if not exc.permanent:
                        raise
                    return  # logged by the outbox; the thread reply still goes out
                target.ts = None  # someone deleted it: post it again below
            else:
                target.rendered = digest
                await self.store.save_target(tracked.build_id, target)
        if target.ts is None:
            key = f"{tracked.build_id}:{target.channel}:root"
            try:
                target.ts, earlier = await self._post_once(
                    key, target.channel, root, thread_ts=target.thread_ts
                )
            except SlackDeliveryError as exc:
                if exc.permanent:
                    await self._tell_requester(tracked, target, exc)
                    await self._forget_attempt(key)
                raise
            # A message an earlier attempt posted may show an older state: edited below.
            target.rendered = "" if earlier else digest
            await self._record(lambda: self.store.save_target(tracked.build_id, target))
            await self._forget_attempt(key)
            if earlier:
                try:
                    await self.outbox.update(target.channel, target.ts, root)
                except SlackDeliveryError as exc:
                    if not exc.permanent:
                        raise  # retried later: the record says the message is not up to date
                    return
                target.rendered = digest
                await self.store.save_target(tracked.build_id, target)

    async def _post_once(
        self,
        key: str,
        channel: str,
        rendered: Rendered,
        *,
        thread_ts: str | None,
        broadcast: bool = False,
    ) -> tuple[str, bool]:
        """Post a build's message or reply at most once in total, whichever process tries.

        The attempt is noted in Redis first. If an earlier attempt was noted and never recorded
        as done (its process died between Slack's answer and the record, or Slack's answer was
        lost), the outbox looks for that post in Slack before making it again. Returns the ts,
        and whether an earlier attempt may have made the post (then it may show older content).
        """
        tried_since = await self.store.begin_post(key, time.time())
        ts = await self.outbox.post(
            channel,
            rendered,
            thread_ts=thread_ts,
            reply_broadcast=broadcast,
            key=key,
            tried_since=tried_since,
        )
        return ts, tried_since is not None

    async def _forget_attempt(self, key: str) -> None:
        # Left behind, it costs a look-up if the same post is ever attempted again (it expires).
        with contextlib.suppress(RedisError, OSError):
            await self.store.end_post(key)

    async def _record(self, write: Callable[[], Awaitable[None]]) -> None:
        """Record a Slack post that was made, retrying through a short Redis outage."""
        deadline = time.monotonic() + RECORD_PATIENCE
        while True:
            try:
                await write()
                return
            except (RedisError, OSError):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _tell_requester(
        self, tracked: TrackedBuild, target: MessageTarget, exc: SlackDeliveryError
    ) -> None:
        """The build's message cannot be posted: say so to whoever asked, with the fix."""
        if not target.notify_url:
            return
        url = tracked.snapshot.get("web_url")
        title = link(str(url) if url else None, f"{tracked.pipeline} #{tracked.number}")
        text = (
            # Follows "Its progress will be posted here": say plainly that it will not be.
            f":warning: Correction: your build {title} was started, but the bot cannot post its "
            f"progress in this channel after all (`{exc.error}`). Invite the bot here "
            "(`/invite @buildkite`) or run the command from a channel it is in."
        )
        # No fallback to the channel: the bot just failed to post there.
        respond = self.hooks.respond(target.notify_url, channel=None, user=target.requester)
        try:
            await respond(text=text, response_type="ephemeral", replace_original=False)
        except Exception as notify_error:  # the build is fine; the hint is best effort
            log.warning("could not tell %s about %s: %s", target.requester, exc, notify_error)

    async def _block_step(self, tracked: TrackedBuild) -> BlockStep | None:
        """The block step a build waits on (its job id and label), from Buildkite."""
        try:
            full = await self.buildkite.get_build(tracked.pipeline, tracked.number)
        except BuildkiteError as exc:
            log.warning(
                "could not read the block step of %s #%s: %s", tracked.pipeline, tracked.number, exc
            )
            return None
        for job in full.jobs:
            if job.type == "manual" and job.state == "blocked":
                return BlockStep(job_id=job.id, label=job.display_name)
        return None

    async def _reply(
        self,
        kind: str,
        tracked: TrackedBuild,
        build: Build,
        target: MessageTarget,
        details: _Details,
    ) -> tuple[Rendered, bool]:
        if kind == "running":
            return running_reply(tracked.pipeline, build), False
        if kind == "failing":
            return failing_reply(tracked.pipeline, build), False
        failed = build.state is BuildState.FAILED
        mention = target.requester
        if mention is None and failed:
            mention = await details.author_mention()
        reply = final_reply(
            tracked.pipeline,
            build,
            mention,
            await details.failed_jobs() if failed else [],
            log_tail=await details.log_tail() if failed else None,
            after_retry=tracked.retried and build.state is BuildState.PASSED,
        )
        # Only a failure of a build someone asked for is also sent to the channel.
        return reply, failed and target.requester is not None

    async def _after_final(
        self, tracked: TrackedBuild, build: Build, transition: Transition
    ) -> None:
        """Once per build and generation: the branch's outcome, flaky signal, auto-retry."""
        if reply_kind(transition.new) != "final" or transition.new != tracked.phase:
            return
        if not await self.store.once(tracked.build_id, tracked.gen, "final"):
            return
        if tracked.retried and build.state is BuildState.PASSED:
            await self.store.record_flaky(tracked.pipeline, tracked.number, self.clock())
        if build.state is BuildState.FAILED and self.auto_retry is not None:
            await self.auto_retry(tracked, build)

    # -- the polling fallback ---------------------------------------------------------------

    async def run_poller(self, stop: asyncio.Event) -> None:
        """Poll at a fixed rate: cycles start every interval, whatever each one takes."""
        scheduled = self.clock()
        while not stop.is_set():
            try:
                self.metrics.poll_cycle(await self.poll_once())
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("poll cycle skipped, redis unavailable: %s", exc)
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
        list costs at most ACTIVE_PAGES_PER_MINUTE. Builds neither list mentions for a while
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
            wait = min(self.poll_interval * 2**failures, MAX_POLL_BACKOFF)
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
        finished_from = now - FINISHED_OVERLAP
        if newest is not None:
            finished_from = max(finished_from, newest - FINISHED_SETTLE)
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
        spacing = max(self.poll_interval, pages * 60 / ACTIVE_PAGES_PER_MINUTE)
        await self.store.save_poll_state(active_at=now, active_due=now + spacing)

        stale_before = now - STALE_AFTER_INTERVALS * self.poll_interval
        if state.active_at is not None:  # not seen by the last two lists of active builds
            stale_before = min(stale_before, state.active_at)
        for build_id in await self.store.pending(
            seen_before=stale_before, limit=MAX_SINGLE_FETCHES
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
            if await self.observe(build) is not None:
                report.changed += 1

    async def _adopt_awaited(self, report: PollReport, now: float) -> None:
        """Look for the builds asked for without an answer, and follow each one that appeared
        in its requester's channel: tracked first, then taken, so that a crash in between
        leaves it to be adopted again, and `track` gives it one message whoever adopts it."""
        for awaited in await self.store.awaited_due(now, limit=MAX_SINGLE_FETCHES):
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
            await self.track(
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
                if await self.observe(build) is not None:
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
            and budget.remaining < budget.limit * RATE_LIMIT_RESERVE
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


def _rank_of(tracked: TrackedBuild) -> int:
    phase = tracked.phase
    if phase.endswith(":blocked"):
        return _BLOCKED_RANK
    if phase in {s.value for s in BuildState if s.is_terminal}:
        return FINAL_RANK
    try:
        return _RANKS.get(BuildState(phase), 2)
    except ValueError:
        return 0


class _Details:
    """What a failure reply needs from Buildkite and Slack, fetched at most once per write."""

    def __init__(self, tracker: Tracker, tracked: TrackedBuild, build: Build) -> None:
        self.tracker = tracker
        self.tracked = tracked
        self.build = build
        self.block: BlockStep | None = None
        self._full: Build | None = None
        self._fetched = False

    async def _full_build(self) -> Build | None:
        if not self._fetched:
            self._fetched = True
            try:
                self._full = await self.tracker.buildkite.get_build(
                    self.tracked.pipeline, self.tracked.number
                )
            except BuildkiteError as exc:
                log.warning(
                    "could not list failed jobs of %s #%s: %s",
                    self.tracked.pipeline,
                    self.tracked.number,
                    exc,
                )
        return self._full

    async def failed_jobs(self) -> list[Job]:
        full = await self._full_build()
        return full.failed_jobs if full else []

    async def log_tail(self) -> LogTail | None:
        full = await self._full_build()
        job = full.log_tail_job if full else None
        if job is None:
            return None
        try:
            text = await self.tracker.buildkite.job_log_tail(
                self.tracked.pipeline, self.tracked.number, job.id, max_bytes=LOG_TAIL_BYTES
            )
        except PermissionDenied:
            return LogTail(job=job, text=None, missing_scope="read_build_logs")
        except BuildkiteError as exc:
            log.info("no log tail for %s: %s", job.web_url, exc)
            return None
        return LogTail(job=job, text=text)

    async def author_mention(self) -> str | None:
        """The Slack user whose email is the build author's (or creator's), if there is one."""
        directory = self.tracker.people
        if directory is None:
            return None
        people = [p for p in (self.build.author, self.build.creator) if p and p.email]
        for person in people:
            assert person.email is not None
            user = await directory.user_for_email(person.email)
            if user:
                return user
        return None


#: How much of a failed job's log to fetch for the failure reply.
LOG_TAIL_BYTES = 4000
