"""The notifier: reads the transitions `Intake.observe` queued in a Redis stream and writes them.

A transition seen just before a crash is still written after a restart, by this process or
another one: an entry left unacknowledged is taken over once idle. Builds are written in
parallel, each build's transitions in order and under its Redis lock. Final transitions are
offered to the `on_final` listeners (auto-retry), once per build and generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from redis.exceptions import RedisError, ResponseError

from app.ops.metrics import UNWIRED, Metrics
from app.ops.outages import RedisOutage
from app.slack.outbox import SlackDeliveryError
from app.storage.records import TrackedBuild, Transition
from app.storage.store import Store
from app.tracking.phases import process_name, reply_kind
from app.tracking.writer import MessageWriter
from app.tuning import TrackingTuning
from buildkite.errors import BuildkiteError
from buildkite.models import Build

log = logging.getLogger(__name__)

#: Told of a build's final state, once per build and generation, before its transition is done.
FinalListener = Callable[[TrackedBuild, Build], Awaitable[None]]
#: Told of every state change once it is written (the same change may be told again after a
#: crash, or after a listener's temporary Slack failure, so listeners must be idempotent); any
#: other failure is logged and never holds up the transition.
ChangeListener = Callable[[TrackedBuild, Build, Transition], Awaitable[None]]


class Notifier:
    """Turns the queued transitions into Slack writes, exactly once across processes."""

    def __init__(
        self,
        store: Store,
        writer: MessageWriter,
        tuning: TrackingTuning,
        *,
        metrics: Metrics = UNWIRED,
        on_final: Sequence[FinalListener] = (),
        on_change: Sequence[ChangeListener] = (),
        consumer: str | None = None,
        clock: Callable[[], float] = time.time,
        redis_outage: RedisOutage | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self.redis_outage = redis_outage or RedisOutage()
        self.tuning = tuning
        self.metrics = metrics
        self.on_final = tuple(on_final)
        self.on_change = tuple(on_change)
        self.consumer = consumer or process_name()
        self.clock = clock
        #: Slack writes in flight, at most `max_parallel_writes` at once, in order per build.
        self._slots = asyncio.Semaphore(tuning.max_parallel_writes)
        self._writing: set[asyncio.Task[None]] = set()
        #: Per build: the lock that keeps its writes in order, and how many tasks use it.
        self._build_order: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Read, take over and write transitions until `stop` is set."""
        group_ready = False
        last_reclaim = 0.0
        last_prune = float("-inf")  # first at start
        while not stop.is_set():
            try:
                if not group_ready:
                    await self.store.ensure_group()
                    group_ready = True
                batch = await self.store.read_transitions(
                    self.consumer, block_ms=self.tuning.read_block_ms
                )
                if time.monotonic() - last_reclaim > self.tuning.reclaim_idle_ms / 3000:
                    last_reclaim = time.monotonic()
                    batch += await self._reclaim()
                if time.monotonic() - last_prune > self.tuning.prune_consumers_every:
                    last_prune = time.monotonic()
                    gone = await self.store.forget_idle_consumers(
                        self.consumer, idle_ms=self.tuning.dead_consumer_idle_ms
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
                # Redis is down: /readyz says so; a line every second would not help.
                self.redis_outage.failed(exc, "the notifier")
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("notifier cycle failed; retrying")
                await asyncio.sleep(1.0)
            else:
                self.redis_outage.recovered()

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
            self.consumer, min_idle_ms=self.tuning.reclaim_idle_ms
        ):
            if await self.store.delivery_count(transition.entry_id) > self.tuning.max_deliveries:
                log.error(
                    "giving up on %s -> %s of build %s after %d attempts",
                    transition.old,
                    transition.new,
                    transition.build_id,
                    self.tuning.max_deliveries,
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
                build = await self.writer.write(tracked, transition)
                if transition.channel is None and transition.gen == tracked.gen:
                    await self._after_final(tracked, build, transition)
                if transition.channel is None:
                    await self._changed(tracked, build, transition)
            except SlackDeliveryError as exc:
                if not exc.permanent:
                    return False  # left unacknowledged: retried after reclaim_idle_ms
            await self.store.ack_transition(transition.entry_id)
            self.metrics.build_transition(transition.old, transition.new)
            return True

    async def _changed(self, tracked: TrackedBuild, build: Build, transition: Transition) -> None:
        for listener in self.on_change:
            try:
                await listener(tracked, build, transition)
            except SlackDeliveryError as exc:
                if not exc.permanent:
                    raise  # the transition is written again later; the listeners are idempotent
                log.warning("a state-change listener's Slack write failed: %s", exc)
            except Exception:
                log.exception("a state-change listener failed for build %s", tracked.build_id)

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
                await asyncio.sleep(self.tuning.lock_renew_ms / 1000)
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

    async def _after_final(
        self, tracked: TrackedBuild, build: Build, transition: Transition
    ) -> None:
        """Once per build and generation: the final listeners (auto-retry)."""
        if reply_kind(transition.new) != "final" or transition.new != tracked.phase:
            return
        if not await self.store.once(tracked.build_id, tracked.gen, "final"):
            return
        for listener in self.on_final:
            await listener(tracked, build)
