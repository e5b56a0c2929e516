"""One account of a Redis outage for all the bot's loops: logged once when it starts, at most
once an interval while it lasts, and once when Redis is back; never a traceback per cycle."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class RedisOutage:
    """Shared by every loop that needs Redis: each reports its cycle's failure or success."""

    def __init__(
        self,
        where: str = "redis",
        *,
        repeat_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The server, its password masked (the caller masks it: this module sees no settings).
        self.where = where
        self.repeat_every = repeat_every
        self.clock = clock
        self.since: float | None = None
        self._last_line = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, doing: str = "") -> None:
        """A cycle failed because Redis could not be reached (`doing`: which loop, for the log)."""
        now = self.clock()
        cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        during = f" ({doing} waits)" if doing else ""
        if self.since is None:
            self.since = self._last_line = now
            log.warning(
                "redis unavailable at %s: %s%s; retrying, with at most one line every %.0f s "
                "until it is back",
                self.where,
                cause,
                during,
                self.repeat_every,
            )
        elif now - self._last_line >= self.repeat_every:
            self._last_line = now
            down_for = now - self.since
            log.warning("redis still down at %s after %.0f s: %s", self.where, down_for, cause)

    def recovered(self) -> None:
        """A cycle that needed Redis succeeded."""
        if self.since is None:
            return
        log.info("redis is back at %s after %.0f s", self.where, self.clock() - self.since)
        self.since = None
