"""Waiting without asking Buildkite: agents' waits wake on the announcements the store makes
when a tracked build's phase changes or an approval is settled (a pub/sub channel beside the
events stream), and re-read only Redis.

One subscription per process serves every wait. A lost announcement (or a Redis without
pub/sub) only delays a wait until its next re-read (`AgentTuning.wait_recheck`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app.storage.codec import text
from app.storage.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


class Changes:
    """The process's one subscription to the store's change announcements."""

    def __init__(self, store: Store, *, recheck: float) -> None:
        self.store = store
        self.recheck = recheck
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        #: Set while the subscription is up: a wait reads only once it is, so that no change
        #: between its read and its sleep goes unheard.
        self._subscribed = asyncio.Event()

    def start(self) -> None:
        """Subscribe now (the bot does at start-up), rather than at the first wait."""
        if self._task is None and not self._closed.is_set():
            self._task = asyncio.create_task(self._listen(), name="agent-waits")

    async def _listen(self) -> None:
        while not self._closed.is_set():
            pubsub: PubSub | None = None
            try:
                pubsub = await self.store.subscribe_changes()
                self._subscribed.set()
                while not self._closed.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._wake(text(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Waits still re-read the records; try the subscription again in a while. Not
                # only Redis's errors: a cold cluster client raises KeyError (no slots yet), and
                # a listener that ended for good would leave every wait to its re-reads.
                expected = isinstance(exc, (RedisError, OSError, NotImplementedError))
                log.log(
                    logging.INFO if expected else logging.WARNING,
                    "agent waits: no change announcements for now (%s: %s)",
                    type(exc).__name__,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), timeout=5 * self.recheck)
            finally:
                self._subscribed.clear()
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    @property
    def waiting(self) -> int:
        """How many waits are in progress (for /metrics and tests)."""
        return sum(len(w) for w in self._waiters.values())

    def _wake(self, topic: str) -> None:
        for event in self._waiters.get(topic, ()):
            event.set()

    async def wait_until(
        self,
        topic: str,
        read: Callable[[], Awaitable[T]],
        done: Callable[[T], bool],
        *,
        timeout: float,  # noqa: ASYNC109 - the tool's own argument, bounded by the caller
    ) -> tuple[T, bool]:
        """Read until `done(value)`, waking on `topic`'s announcements (and every `recheck`);
        returns the last value read and whether it was done before `timeout` (or shutdown)."""
        self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self._subscribed.is_set() and not self._closed.is_set():
            # Subscribing takes a round trip; without it the wait still re-reads every recheck.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), timeout=min(timeout, 1.0))
        event = asyncio.Event()
        self._waiters[topic].add(event)
        try:
            while True:
                event.clear()
                value = await read()
                if done(value):
                    return value, True
                left = deadline - loop.time()
                if left <= 0 or self._closed.is_set():
                    return value, False
                closing = asyncio.ensure_future(self._closed.wait())
                woken = asyncio.ensure_future(event.wait())
                try:
                    await asyncio.wait(
                        [closing, woken],
                        timeout=min(left, self.recheck),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    closing.cancel()
                    woken.cancel()
        finally:
            waiters = self._waiters.get(topic)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[topic]

    async def close(self) -> None:
        """Stop listening; waits in progress return at once (not reached)."""
        self._closed.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
