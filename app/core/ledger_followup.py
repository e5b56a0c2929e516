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
from buildkite.errors import BuildkiteError, NotFound

log = logging.getLogger(__name__)

#: A build still running is asked about again after a tenth of its age, at most this long.
MAX_WAIT = 3600.0


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
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.recorder = recorder
        self.clock = clock
        #: How often the sweep looks: the least wait between two asks about one build.
        self.interval = interval

    async def sweep(self) -> int:
        """Ask Buildkite about each deployment due; returns how many ends it recorded."""
        now = self.clock()
        ended = 0
        # Leased for one interval: a replica that dies mid-way leaves it to another then.
        for pipeline, number in await self.store.take_deployment_followups(
            now, lease_until=now + self.interval
        ):
            entry = await self.store.deployment(pipeline, number)
            if entry is None or entry.outcome is not Outcome.RUNNING:
                await self.store.deployment_followed_up(pipeline, number)  # ended, or expired
                continue
            if await self.store.find(pipeline, number) is not None:
                # The tracker follows it after all (the bot started it again, or Redis came
                # back): its notifier records the end.
                await self.store.deployment_followed_up(pipeline, number)
                continue
            try:
                build = await self.buildkite.get_build(pipeline, number)
            except NotFound:
                log.warning("%s #%s no longer exists; its end is not known", pipeline, number)
                await self.store.deployment_followed_up(pipeline, number)
                continue
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
