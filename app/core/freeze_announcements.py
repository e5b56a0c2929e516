"""The start and end of each freeze, announced once in the channels of the pipelines it covers,
whichever replica's sweep sees it first (a Redis SET NX per occurrence, edge and channel)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from app.core.freezes import Freeze, Occurrence, utc, view_of
from app.core.policy import Policy
from app.ops.outages import RedisOutage
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render import freezes as render
from app.slack.render.common import notice
from app.storage.keys import FREEZE_ANNOUNCED_KEEP
from app.storage.store import Store
from app.tuning import SweepTuning

log = logging.getLogger(__name__)


def _overlap(a: str, b: str) -> bool:
    """Two pipeline globs (or slugs) that may name a pipeline in common."""
    return a == b or fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a)


def freeze_channels(freeze: Freeze, policy: Policy) -> list[str]:
    """Where a freeze is announced: its own `channels`, else the channels of the notification
    routes and rules whose pipelines it may cover."""
    if freeze.channels is not None:
        return list(freeze.channels)
    found: list[str] = []
    for route in policy.data.notifications:
        if any(_overlap(r, f) for r in route.pipelines for f in freeze.pipelines):
            found.append(route.channel)
    rules = policy.data.pipelines
    for pattern, rule in rules.items():
        if rule.channels and any(_overlap(pattern, f) for f in freeze.pipelines):
            found += rule.channels
    if policy.data.default.channels and any(f not in rules for f in freeze.pipelines):
        found += policy.data.default.channels
    return list(dict.fromkeys(found))


#: The claim's "channel" for an edge's republish of the App Homes (no Slack channel is named so).
HOMES = "home"


class FreezeAnnouncer:
    """Posts each freeze occurrence's start and end, once per channel across replicas; and at
    each, once across replicas, has the App Homes republished (`homes_changed`), whose "Active
    freezes" it changes."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        outbox: Outbox,
        tuning: SweepTuning,
        clock: Callable[[], float],
        *,
        homes_changed: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.policy = policy
        self.store = store
        self.outbox = outbox
        self.tuning = tuning
        self.clock = clock
        self.homes_changed = homes_changed

    async def sweep(self) -> int:
        """Announce what started or ended since the last look; returns how many posts."""
        now = self.clock()
        moment = utc(now)
        late = dt.timedelta(seconds=self.tuning.announce_late)
        posted = 0
        for freeze in self.policy.data.freezes:
            channels = freeze_channels(freeze, self.policy)
            if not channels and self.homes_changed is None:
                continue
            for occurrence in freeze.occurrences(moment - late, moment + dt.timedelta(seconds=1)):
                if occurrence.active(moment):
                    edge, keep = "start", occurrence.end - moment
                elif occurrence.end <= moment:
                    edge, keep = "end", dt.timedelta(0)
                else:
                    continue
                ttl = int(keep.total_seconds()) + FREEZE_ANNOUNCED_KEEP
                started_late = moment - occurrence.start > late
                for channel in channels:
                    posted += await self._announce(occurrence, edge, channel, ttl, started_late)
                await self._republish_homes(occurrence, edge, ttl)
        return posted

    async def _republish_homes(self, occurrence: Occurrence, edge: str, ttl: int) -> None:
        """Once per edge across replicas (the announcements' own claim, on a channel of its
        own), whether or not the freeze is announced anywhere."""
        if self.homes_changed is None:
            return
        took, _ = await self.store.claim_freeze_edge(
            occurrence.key,
            edge,
            HOMES,
            ttl,
            now=self.clock(),
            lease=self.tuning.announce_lease,
            wall=time.time(),
        )
        if not took:
            return
        try:
            await self.homes_changed()
        except Exception:
            await self.store.release_freeze_edge(occurrence.key, edge, HOMES)
            raise
        await self.store.freeze_edge_done(occurrence.key, edge, HOMES)

    def _still_frozen(self, ended: Occurrence) -> Occurrence | None:
        """Another freeze in force on some of the ended one's pipelines (one that follows on,
        or overlaps it), so that its end does not say they may be deployed."""
        moment = utc(self.clock())
        found = [
            occurrence
            for freeze in self.policy.data.freezes
            if freeze.key != ended.freeze.key
            and any(_overlap(a, b) for a in freeze.pipelines for b in ended.freeze.pipelines)
            for occurrence in freeze.occurrences(moment, moment + dt.timedelta(seconds=1))
            if occurrence.active(moment)
        ]
        return max(found, key=lambda o: o.end, default=None)

    async def _announce(
        self, occurrence: Occurrence, edge: str, channel: str, ttl: int, late: bool
    ) -> int:
        took, tried_since = await self.store.claim_freeze_edge(
            occurrence.key,
            edge,
            channel,
            ttl,
            now=self.clock(),
            lease=self.tuning.announce_lease,
            wall=time.time(),
        )
        if not took:
            return 0
        view = view_of(occurrence)
        if edge == "start":
            text = render.freeze_started(view, late=late)
        else:
            still = self._still_frozen(occurrence)
            text = render.freeze_ended(view, view_of(still) if still is not None else None)
        try:
            await self.outbox.post(
                channel,
                notice(text),
                key=f"freeze:{occurrence.key}:{edge}:{channel}",
                tried_since=tried_since,
            )
        except SlackDeliveryError as exc:
            if exc.permanent:  # the bot may not post there: saying so once in the log is enough
                log.warning("freeze %s not announced in %s: %s", edge, channel, exc.error)
                await self.store.freeze_edge_done(occurrence.key, edge, channel)
                return 0
            await self.store.release_freeze_edge(occurrence.key, edge, channel)
            raise
        await self.store.freeze_edge_done(occurrence.key, edge, channel)
        log.info("freeze %s announced in %s: %s", edge, channel, occurrence.freeze.reason)
        return 1


async def sweep_every(
    what: str,
    sweep: Callable[[], Awaitable[object]],
    interval: float,
    stop: asyncio.Event,
    outage: RedisOutage,
) -> None:
    """Run `sweep` (a coroutine function) every `interval` seconds until `stop` is set."""
    while not stop.is_set():
        try:
            await sweep()
        except (RedisError, OSError) as exc:
            outage.failed(exc, what)
        except Exception:
            log.exception("%s failed; retrying", what)
        else:
            outage.recovered()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
