"""The end of deployments the ledger shows running but no tracker follows (recorded so by
`ledger rebuild` after Redis was lost): one replica at a time asks Buildkite how each ended,
a single build GET each, less often as it runs longer."""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.core.releases import LedgerRecorder
from app.storage.ledger import Outcome
from app.storage.store import Store
from app.tuning import DEFAULT
from buildkite.client import BuildkiteClient
from buildkite.errors import (
    AuthenticationError,
    BuildkiteError,
    NotFound,
    PermissionDenied,
    RateLimited,
)

log = logging.getLogger(__name__)

#: A build still running is asked about again after a tenth of its age, at most this long.
MAX_WAIT = 3600.0
#: Each member taken is leased for this many intervals: a slow sweep (Buildkite answering
#: slowly, 50 members) is not taken over by another replica's next sweep.
LEASE_INTERVALS = 3


class LedgerFollowUp:
    """Brings the ledger's unfollowed running deployments to their final state."""

    def __init__(
        self,
        store: Store,
        buildkite: BuildkiteClient,
        recorder: LedgerRecorder,
        clock: Callable[[], float],
        *,
        interval: float = DEFAULT.sweeps.ledger_interval,
        give_up_after: float = DEFAULT.sweeps.ledger_give_up_after,
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.recorder = recorder
        self.clock = clock
        #: How often the sweep looks: the least wait between two asks about one build.
        self.interval = interval
        #: A deployment running longer than this since it started is no longer asked about.
        self.give_up_after = give_up_after

    async def sweep(self) -> int:
        """Ask Buildkite about each deployment due; returns how many ends it recorded."""
        now = self.clock()
        ended = 0
        # A replica that dies mid-way leaves its members to another when their lease ends.
        taken = await self.store.take_deployment_followups(
            now, lease_until=now + LEASE_INTERVALS * self.interval
        )
        for index, (pipeline, number) in enumerate(taken):
            entry = await self.store.deployment(pipeline, number)
            if entry is None or entry.outcome is not Outcome.RUNNING:
                await self.store.deployment_followed_up(pipeline, number)  # ended, or expired
                continue
            if await self.store.find(pipeline, number) is not None:
                # The tracker follows it after all (the bot started it again, or Redis came
                # back): its notifier records the end.
                await self.store.deployment_followed_up(pipeline, number)
                continue
            if entry.started_at is not None and now - entry.started_at > self.give_up_after:
                log.warning(
                    "%s #%s still runs %.0f h after it started: no longer asked how it ends "
                    "(a `ledger rebuild` after its end records it)",
                    pipeline,
                    number,
                    (now - entry.started_at) / 3600,
                )
                await self.store.deployment_followed_up(pipeline, number)
                continue
            try:
                build = await self.buildkite.get_build(pipeline, number)
            except (NotFound, PermissionDenied) as exc:
                # Gone, or the token may not read it: asking again would answer the same.
                log.warning(
                    "%s #%s: its end is not known, no longer asked: %s", pipeline, number, exc
                )
                await self.store.deployment_followed_up(pipeline, number)
                continue
            except (RateLimited, AuthenticationError) as exc:
                # Every other ask would fail alike: the sweep stops, and what it took waits
                # for the rate limit's reset (a bad token: an hour) instead of its lease.
                wait = exc.reset if isinstance(exc, RateLimited) and exc.reset else MAX_WAIT
                later = now + max(wait, self.interval)
                for waiting in taken[index:]:
                    await self.store.follow_up_later(*waiting, at=later)
                log.warning(
                    "could not ask how %d deployments ended, asking again in %.0f s: %s",
                    len(taken) - index,
                    later - now,
                    exc,
                )
                break
            except BuildkiteError as exc:
                log.warning("could not ask how %s #%s ended: %s", pipeline, number, exc)
                continue  # asked again when its lease runs out
            if not build.is_final:
                age = now - (entry.started_at or now)
                wait = min(max(age / 10, self.interval), MAX_WAIT)
                await self.store.follow_up_later(pipeline, number, at=now + wait)
                continue
            if await self.recorder.ended(build, pipeline):
                ended += 1
            await self.store.deployment_followed_up(pipeline, number)
        return ended
