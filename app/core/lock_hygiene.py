"""Lock hygiene: a lock held long reminds its holder by DM (once per `lock_reminder_after`
period, across replicas), an expired lock is told to the channel it was taken in, and an admin
who lifts someone else's lock tells the holder."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from app.core.policy import Policy, is_agent
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render import lock_hygiene as render
from app.slack.render.common import notice
from app.storage.records import ExpiredLock, PipelineLock
from app.storage.store import Store
from app.tuning import DEFAULT

log = logging.getLogger(__name__)

_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")


class LockHygiene:
    """The sweep of reminders and expiries, and the note to a holder whose lock was lifted."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        outbox: Outbox,
        clock: Callable[[], float],
        *,
        late: float = DEFAULT.sweeps.announce_late,
        lease: float = DEFAULT.sweeps.lock_expiry_lease,
    ) -> None:
        self.policy = policy
        self.store = store
        self.outbox = outbox
        self.clock = clock
        #: An expiry older than this (no bot ran meanwhile, or Slack failed all along) is not told.
        self.late = late
        #: How long the sweep that took an expiry has to tell of it before another may: longer
        #: than the slowest post (see `SweepTuning.lock_expiry_lease`), or both would post.
        self.lease = lease

    async def sweep(self) -> int:
        """Remind holders of long-held locks and tell of expired ones; returns how many posts."""
        now = self.clock()
        posted = 0
        await self.store.index_unindexed_locks()
        for expired in await self.store.take_expired_locks(now, lease_until=now + self.lease):
            if await self._tell_expired(expired, now):
                posted += 1
        period = self.policy.data.lock_reminder_after
        for lock in await self.store.held_locks():
            if lock.expires_at is not None and lock.expires_at <= now:
                continue  # expiring now: the channel hears of that instead
            held = now - lock.since
            nth = int(held // period)
            if nth < 1:
                continue
            # One reminder per period, whichever replica sees it first; none for periods missed.
            if not await self.store.claim_lock_reminder(lock, nth, ttl=2 * period):
                continue
            text = render.lock_reminder(lock, held)
            if await self._post(self._person(lock.user), text, f"lockremind:{_id(lock)}:{nth}"):
                posted += 1
        return posted

    async def _tell_expired(self, expired: ExpiredLock, now: float) -> bool:
        """Tell the channel `expired.lock` expired: once, across replicas. A failure for now
        (rate limit, 5xx, network) is given back to the next sweep, which looks for the post
        first; a permanent one (the bot may not post there) is dropped."""
        lock = expired.lock
        if not lock.channel or (lock.expires_at is not None and now - lock.expires_at > self.late):
            # Nowhere to tell, or news of the past (first seen late, or failing for that long).
            await self.store.expiry_told(expired)
            return False
        try:
            await self.outbox.post(
                lock.channel,
                notice(render.lock_expired(lock)),
                key=f"lockexpired:{_id(lock)}",
                tried_since=lock.expires_at if expired.tried else None,
            )
        except SlackDeliveryError as exc:
            if exc.permanent:
                log.warning(
                    "expiry of the lock on %s not told in %s, dropped: %s",
                    lock.pipeline,
                    lock.channel,
                    exc,
                )
                await self.store.expiry_told(expired)
            else:
                await self.store.tell_expiry_later(expired, now)
            return False
        await self.store.expiry_told(expired)
        return True

    async def lifted(self, lock: PipelineLock, by: str) -> None:
        """`by` (an admin) lifted `lock`, which someone else held: tell the holder by DM."""
        if by == lock.user:
            return
        text = render.lock_lifted(lock, by)
        await self._post(self._person(lock.user), text, f"locklifted:{_id(lock)}")

    def _person(self, holder: str) -> str | None:
        """Whom to DM about `holder`'s lock: the person, or the one an agent acts for; None
        for an agent that acts for nobody, or a holder that is no Slack user id."""
        person = self.policy.acts_for(holder) if is_agent(holder) else holder
        return person if person and _USER_ID.match(person) else None

    async def _post(self, channel: str | None, text: str, key: str) -> bool:
        if not channel:
            return False
        try:
            await self.outbox.post(channel, notice(text), key=key)
        except SlackDeliveryError as exc:
            # A note about a lock is not worth failing the sweep or an unlock for.
            log.warning("lock note not posted to %s: %s", channel, exc.error)
            return False
        return True


def _id(lock: PipelineLock) -> str:
    return f"{lock.pipeline}:{int(lock.since)}"
