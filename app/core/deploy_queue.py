"""The in-memory queue that bounds how many slash-command deploys run, and wait, at once."""

from __future__ import annotations

import asyncio
from typing import Any, Self

from app.tuning import DEFAULT


class DeployQueue:
    """Deploys asked for by slash command: `running` at a time, the next `waiting` in the order
    they came; any more are refused when they are acknowledged.

    A burst of /deploy is acknowledged at once whatever happens; this bounds the work (and the
    Buildkite calls) it leaves behind, so the acks after it stay just as fast. Admission is
    decided in memory, before the ack, with no I/O.
    """

    def __init__(
        self, *, running: int = DEFAULT.deploys.running, waiting: int = DEFAULT.deploys.waiting
    ) -> None:
        if running < 1 or waiting < 0:
            raise ValueError("running must be at least 1 and waiting not negative")
        self.running = running
        self.waiting = waiting
        self._turns = asyncio.Semaphore(running)
        self._admitted = 0
        self._closed = asyncio.Event()

    def close(self) -> None:
        """Shutting down: deploys still waiting for their turn give up now (`QueueClosed`)."""
        self._closed.set()

    def reserve(self) -> DeployPlace | None:
        """A place in the queue, or None when it is full."""
        if self._admitted >= self.running + self.waiting:
            return None
        position = max(0, self._admitted - self.running + 1)
        self._admitted += 1
        return DeployPlace(self, position)


class QueueClosed(Exception):
    """The bot is shutting down: a deploy still waiting for its turn will not start."""


class DeployPlace:
    """One admitted deploy: wait for `turn()` inside `async with`; leaving frees the place."""

    def __init__(self, queue: DeployQueue, position: int) -> None:
        self._queue = queue
        #: 0 when it could start at once, else its place in line when it was admitted (1: next).
        self.position = position
        self._running = False
        self._left = False

    async def turn(self) -> None:
        """Wait until fewer than `running` deploys run (first come, first served).

        Raises `QueueClosed` if the bot starts shutting down first: the deploy never starts.
        """
        queue = self._queue
        if queue._closed.is_set():
            raise QueueClosed
        acquire = asyncio.ensure_future(queue._turns.acquire())
        closed = asyncio.ensure_future(queue._closed.wait())
        try:
            await asyncio.wait({acquire, closed}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            closed.cancel()
            self._give_up(acquire)
            raise
        closed.cancel()
        if queue._closed.is_set():
            self._give_up(acquire)
            raise QueueClosed
        self._running = True

    def _give_up(self, acquire: asyncio.Future[Any]) -> None:
        """Leave the line: a turn already granted is handed back, a pending wait cancelled."""
        if not acquire.done():
            acquire.cancel()  # Semaphore.acquire hands back a turn granted meanwhile itself
        elif not acquire.cancelled() and acquire.exception() is None:
            self._queue._turns.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._left:
            return
        self._left = True
        self._queue._admitted -= 1
        if self._running:
            self._queue._turns.release()
