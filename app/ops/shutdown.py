"""One time budget for the whole stop, so that the steps of a shutdown do not add up their waits.

Each step (disconnecting Socket Mode, the requests in flight, the notifier's last writes, the
loops, aiohttp's handlers, the outbox's last edits) waits at most what is left of the budget,
and a step that finds it spent still gets a short moment to finish what needs no waiting.
"""

from __future__ import annotations

import asyncio

#: What a step still gets once the budget is spent: enough to run what is ready, no more.
FLOOR = 0.1


class StopBudget:
    """Started when the bot begins to stop; `left()` is what a step may still wait."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end: float | None = None

    def start(self) -> None:
        """Start the clock (a second call keeps the first start)."""
        if self._end is None:
            self._end = asyncio.get_running_loop().time() + self.seconds

    def left(self) -> float:
        """Seconds a step may still wait: the whole budget before the stop began."""
        if self._end is None:
            return self.seconds
        return max(FLOOR, self._end - asyncio.get_running_loop().time())
