"""Sending a request that starts a build (a create or a rebuild) so that one call never
starts two builds: after an answer that may have been lost, look for the build instead."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from buildkite.client.transport import Transport, never_sent
from buildkite.errors import BuildkiteError, BuildkiteUnavailable, BuildMaybeStarted, ServerError
from buildkite.models import Build

__all__ = ["StartLookup", "start_build"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartLookup:
    """How long to look for the build of a create or rebuild that may have reached Buildkite
    without an answer: as long as a create can take, with waits doubling up to ``max_wait``."""

    #: Seconds of waiting in all; a create that is still unknown then is reported as such.
    patience: float = 60.0
    first_wait: float = 1.0
    max_wait: float = 16.0

    def __post_init__(self) -> None:
        if self.patience < 0 or self.first_wait <= 0 or self.max_wait < self.first_wait:
            raise ValueError("start lookup waits must be positive and patience not negative")

    def waits(self) -> Iterator[float]:
        """The wait before each look: 1, 2, 4, 8, 16, 16, ... adding up to ``patience``."""
        left, wait = self.patience, self.first_wait
        while True:
            this = min(wait, left) if left > 0 else 0.0
            yield this
            left -= this
            if left <= 0:
                return
            wait = min(wait * 2, self.max_wait)


async def start_build(
    transport: Transport,
    lookup: StartLookup,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    find_started: Callable[[], Awaitable[Build | None]],
    *,
    request_id: str | None,
) -> Build:
    """Send a request that starts a build, and never send it twice once it may have arrived.

    A request that certainly never reached Buildkite (no connection was made) is retried
    like any other. After one that may have (a timeout once sent, a lost answer, a 5xx),
    ``find_started`` looks for its build, with backoff, for ``lookup.patience`` seconds;
    ``BuildMaybeStarted`` if it never shows up. Buildkite may still be creating it.
    """
    failures = 0
    while True:
        try:
            response = await transport.request(method, path, json=body, retry=False)
        except BuildkiteUnavailable as exc:
            if never_sent(exc) and failures < transport.max_retries:
                failures += 1
                await transport.sleep(transport.backoff(failures))
                continue
            if never_sent(exc):
                raise BuildkiteUnavailable(
                    method, exc.path, attempts=failures + 1, reason=exc.reason, reached=False
                ) from exc
            reason = exc.reason
        except ServerError as exc:
            reason = f"HTTP {exc.status}"
        else:
            return transport.parse(response, Build)
        break
    waited = 0.0
    began = time.monotonic()
    for wait in lookup.waits():
        await transport.sleep(wait)
        waited += wait
        try:
            found = await find_started()
        except BuildkiteError as exc:
            # Not an answer either way: keep looking while patience lasts.
            log.warning("looking for the build of %s %s failed: %s", method, path, exc)
            found = None
        if found is not None:
            log.info(
                "%s %s got no answer (%s); its build #%s was found after %.0f s",
                method,
                transport.display_path(transport.base_url + path),
                reason,
                found.number,
                time.monotonic() - began,
            )
            return found
        if time.monotonic() - began >= lookup.patience:
            break
    raise BuildMaybeStarted(
        method,
        transport.display_path(transport.base_url + path),
        reason=reason,
        waited=max(waited, time.monotonic() - began),
        request_id=request_id,
    )
