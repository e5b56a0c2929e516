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
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from app import messages
from app.outbox import Outbox, SlackDeliveryError
from app.store import Store, TrackedBuild, Transition
from buildkite.client import SOURCE_META_KEY, SOURCE_META_VALUE, BuildkiteClient
from buildkite.errors import BuildkiteError
from buildkite.models import ACTIVE_STATES, Build, BuildState, Job

log = logging.getLogger(__name__)

_SNAPSHOT_FIELDS = {
    "id",
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
RECLAIM_IDLE_MS = 30_000
#: A pending build not seen by the org-wide lists for this many poll intervals is fetched alone.
STALE_AFTER_INTERVALS = 4
#: At most this many single-build fetches per poll cycle, to stay within the rate budget.
MAX_SINGLE_FETCHES = 10
#: Overlap of the `finished_from` window, for clock skew between us and Buildkite.
FINISHED_OVERLAP = 120.0


def phase_of(build: Build) -> tuple[str, int]:
    """A build's phase (its state, marked when on a block step) and its rank in a build's life."""
    if build.is_final:
        return build.state.value, 5
    if build.is_waiting_on_block:
        return f"{build.state.value}:blocked", 4
    rank = {
        BuildState.CREATING: 1,
        BuildState.SCHEDULED: 1,
        BuildState.RUNNING: 2,
        BuildState.FAILING: 3,
        BuildState.CANCELING: 3,
    }.get(build.state, 2)
    return build.state.value, rank


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
    requests: int = 0
    observed: int = 0
    changed: int = 0
    skipped: bool = False


class Tracker:
    """Follows the builds the bot started and writes their messages."""

    def __init__(
        self,
        store: Store,
        buildkite: BuildkiteClient,
        outbox: Outbox,
        *,
        poll_interval: float = 15.0,
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.outbox = outbox
        self.poll_interval = poll_interval
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = clock

    # -- the one way in ---------------------------------------------------------------------

    async def track(
        self, build: Build, *, pipeline: str, channel: str, requester: str, thread_ts: str | None
    ) -> bool:
        """Start following a build; its message is posted by the notifier."""
        phase, rank = phase_of(build)
        tracked = TrackedBuild(
            build_id=build.id,
            pipeline=pipeline,
            number=build.number,
            channel=channel,
            requester=requester,
            thread_ts=thread_ts,
        )
        return await self.store.track(
            tracked, phase=phase, rank=rank, snapshot=snapshot(build), final=build.is_final
        )

    async def observe(self, build: Build) -> str | None:
        """Feed a build seen anywhere; returns the previous phase if this call changed it."""
        phase, rank = phase_of(build)
        return await self.store.observe(
            build.id,
            phase=phase,
            rank=rank,
            snapshot=snapshot(build),
            final=build.is_final,
            blocked=build.is_waiting_on_block and not build.is_final,
            now=self.clock(),
        )

    # -- transitions to Slack ---------------------------------------------------------------

    async def run_notifier(self, stop: asyncio.Event) -> None:
        await self.store.ensure_group()
        last_reclaim = 0.0
        while not stop.is_set():
            try:
                batch = await self.store.read_transitions(self.consumer, block_ms=500)
                if time.monotonic() - last_reclaim > RECLAIM_IDLE_MS / 3000:
                    last_reclaim = time.monotonic()
                    batch += await self.store.reclaim_transitions(
                        self.consumer, min_idle_ms=RECLAIM_IDLE_MS
                    )
                for transition in batch:
                    await self.process(transition)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notifier cycle failed; retrying")
                await asyncio.sleep(1.0)

    async def process(self, transition: Transition) -> bool:
        """Write what one transition implies to Slack; True once it is done (and acknowledged)."""
        token = await self._lock(transition.build_id)
        if token is None:
            return False  # another process holds it; the entry is reclaimed later if it dies
        try:
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
            return True
        finally:
            await self.store.release_lock(transition.build_id, token)

    async def _lock(self, build_id: str, wait: float = 5.0) -> str | None:
        deadline = time.monotonic() + wait
        while True:
            token = await self.store.acquire_lock(build_id)
            if token is not None or time.monotonic() > deadline:
                return token
            await asyncio.sleep(0.05)

    async def _write(self, tracked: TrackedBuild, transition: Transition) -> None:
        build = Build.model_validate(tracked.snapshot)
        root = messages.build_message(tracked.pipeline, build, tracked.requester)
        digest = root.digest()
        if tracked.ts is None:
            tracked.ts = await self.outbox.post(tracked.channel, root, thread_ts=tracked.thread_ts)
            await self.store.set_message(tracked.build_id, ts=tracked.ts, rendered=digest)
        elif digest != tracked.rendered:
            await self.outbox.update(tracked.channel, tracked.ts, root)
            await self.store.set_message(tracked.build_id, ts=tracked.ts, rendered=digest)

        kind = reply_kind(transition.new)
        if kind is None or transition.gen != tracked.gen:
            return
        # A running or failing reply already overtaken by a later state stays out of the thread.
        if kind != "final" and transition.new != tracked.phase:
            return
        if await self.store.was_posted(tracked.build_id, tracked.gen, kind):
            return
        reply, broadcast = await self._reply(kind, tracked, build)
        await self.outbox.post(
            tracked.channel, reply, thread_ts=tracked.reply_thread, reply_broadcast=broadcast
        )
        await self.store.mark_posted(tracked.build_id, tracked.gen, kind)

    async def _reply(
        self, kind: str, tracked: TrackedBuild, build: Build
    ) -> tuple[messages.Rendered, bool]:
        if kind == "running":
            return messages.running_reply(tracked.pipeline, build), False
        if kind == "failing":
            return messages.failing_reply(tracked.pipeline, build), False
        failed_jobs: list[Job] = []
        if build.state is BuildState.FAILED:
            try:
                full = await self.buildkite.get_build(tracked.pipeline, tracked.number)
                failed_jobs = full.failed_jobs
            except BuildkiteError as exc:
                log.warning(
                    "could not list failed jobs of %s #%s: %s",
                    tracked.pipeline,
                    tracked.number,
                    exc,
                )
        reply = messages.final_reply(tracked.pipeline, build, tracked.requester, failed_jobs)
        return reply, build.state is BuildState.FAILED

    # -- the polling fallback ---------------------------------------------------------------

    async def run_poller(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("poll cycle failed; retrying next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_interval)

    async def poll_once(self) -> PollReport:
        """One poll cycle, done by one process per interval across all replicas.

        Two org-wide lists filtered to the bot's own builds cover every pending build: the active
        ones, and those finished since the last cycle. Builds neither list mentions for a while
        (say, a rebuild started outside the bot) are fetched one by one, a few per cycle.
        """
        report = PollReport()
        if await self.store.pending_count() == 0:
            return report
        lease_ms = int(self.poll_interval * 1000 * 0.9)
        if not await self.store.acquire_poll_lease(self.consumer, max(lease_ms, 100)):
            report.skipped = True
            return report
        pending = set(await self.store.pending())
        now = self.clock()
        last = await self.store.last_poll()
        since = (last if last is not None else now - 3600) - FINISHED_OVERLAP
        mine = {SOURCE_META_KEY: SOURCE_META_VALUE}
        queries = [
            {"state": list(ACTIVE_STATES)},
            {"finished_from": datetime.fromtimestamp(since, tz=UTC)},
        ]
        for query in queries:
            report.requests += 1
            async for build in self.buildkite.list_builds(
                meta_data=mine,
                exclude_jobs=True,
                per_page=100,
                **query,  # type: ignore[arg-type]
            ):
                if build.id in pending:
                    report.observed += 1
                    if await self.observe(build) is not None:
                        report.changed += 1
        await self.store.set_last_poll(now)

        stale_before = now - STALE_AFTER_INTERVALS * self.poll_interval
        for build_id in await self.store.pending(
            seen_before=stale_before, limit=MAX_SINGLE_FETCHES
        ):
            tracked = await self.store.get(build_id)
            if tracked is None:
                continue
            report.requests += 1
            try:
                build = await self.buildkite.get_build(tracked.pipeline, tracked.number)
            except BuildkiteError as exc:
                log.warning("poll of %s #%s failed: %s", tracked.pipeline, tracked.number, exc)
                continue
            report.observed += 1
            if await self.observe(build) is not None:
                report.changed += 1
        return report
