"""What the guards keep: freeze announcements made, blocked builds by branch and the newer
builds that supersede them, lock reminders sent and locks due to expire.

Every "do this once" is a SET NX (or a lease on a sorted set's member, taken by a script) whose
one winner acts, whichever replica asks.
"""

from __future__ import annotations

import math

import redis.asyncio as redis

from app.storage import lua
from app.storage.codec import text
from app.storage.keys import (
    BLOCKED_KEY,
    BREAK_GLASS_KEY,
    EVENTS_MAXLEN,
    EVENTS_STREAM,
    FREEZE_ANNOUNCED_KEY,
    GUARD_TTL,
    LOCK_EXPIRY_KEY,
    LOCK_REMINDED_KEY,
    LOCKS_HELD_KEY,
    LOCKS_INDEXED_KEY,
    LOCKS_INDEXED_TTL,
    NEWEST_KEY,
    PIPELINE_LOCK_KEY,
    SUPERSEDED_FOLLOWUP_KEY,
    SUPERSEDED_KEY,
)
from app.storage.records import ExpiredLock, PipelineLock, SupersededBy

#: Keep the larger of the stored build number and ARGV[1] (with its JSON); answers the JSON kept.
_RAISE_NEWEST = """
local current = redis.call('GET', KEYS[1])
if current then
  local number = tonumber(cjson.decode(current).number)
  if number and number >= tonumber(ARGV[1]) then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return ARGV[2]
"""


#: Mark a build superseded (SET NX) and, for the one caller that marked it, note its follow-up
#: as leased until ARGV[3]; answers 1 for that caller.
_SUPERSEDE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
  return 1
end
return 0
"""

#: Claim a once-only post: free -> leased to the caller ("try:<wall>:<until>"); a lease run out
#: -> leased again, keeping its first try's wall time (answered); "done" (or "1") -> refused.
_CLAIM_EDGE = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], 'try:' .. ARGV[3] .. ':' .. ARGV[2], 'EX', ARGV[4])
  return {1, ''}
end
local since, untl = string.match(current, '^try:([^:]+):([^:]+)$')
if not since or tonumber(untl) > tonumber(ARGV[1]) then
  return {0, ''}
end
redis.call('SET', KEYS[1], 'try:' .. since .. ':' .. ARGV[2], 'KEEPTTL')
return {1, since}
"""


class Guards:
    """Once-only claims and the indexes of the stale-block guard and of lock hygiene."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._raise_newest = client.register_script(_RAISE_NEWEST)
        self._delete_if = client.register_script(lua.source("release_lock"))
        self._supersede = client.register_script(_SUPERSEDE)
        self._take_due = client.register_script(lua.source("take_due"))
        self._claim_edge = client.register_script(_CLAIM_EDGE)

    # -- freeze announcements -----------------------------------------------------------

    async def claim_freeze_edge(
        self,
        occurrence: str,
        edge: str,
        channel: str,
        ttl: int,
        *,
        now: float,
        lease: float,
        wall: float,
    ) -> tuple[bool, float | None]:
        """Whether this caller announces this edge (start, end) in this channel: the first to
        ask, or one that asks once the first's lease (`lease` seconds from its `now`) ran out
        without the post noted done. The second value is then the first try's `wall` time
        (real unix seconds), to look for a post it may have made before it died."""
        key = FREEZE_ANNOUNCED_KEY.format(occurrence=occurrence, edge=edge, channel=channel)
        took, since = await self._claim_edge(
            keys=[key], args=[repr(now), repr(now + lease), repr(wall), max(ttl, 1)]
        )
        return bool(took), (float(text(since)) if text(since) else None)

    async def freeze_edge_done(self, occurrence: str, edge: str, channel: str) -> None:
        """The announcement was made (or may never be): no replica tries it again."""
        key = FREEZE_ANNOUNCED_KEY.format(occurrence=occurrence, edge=edge, channel=channel)
        await self.redis.set(key, "done", xx=True, keepttl=True)

    async def release_freeze_edge(self, occurrence: str, edge: str, channel: str) -> None:
        """The announcement could not be made: let the next sweep try again."""
        key = FREEZE_ANNOUNCED_KEY.format(occurrence=occurrence, edge=edge, channel=channel)
        await self.redis.delete(key)

    # -- break-glass ---------------------------------------------------------------------

    async def claim_break_glass(
        self, pipeline: str, requester: str, approval_id: str, *, ttl: int, stale: str | None
    ) -> str | None:
        """Note `approval_id` as `requester`'s open break-glass request on `pipeline`; None
        when noted, else the id of the one already open. `stale` is an id known to be closed
        (decided or expired), which is replaced."""
        key = BREAK_GLASS_KEY.format(pipeline=pipeline, requester=requester)
        if stale is not None:
            await self._delete_if(keys=[key], args=[stale])
        if await self.redis.set(key, approval_id, nx=True, ex=max(ttl, 1)):
            return None
        current = await self.redis.get(key)
        return text(current) if current is not None else None

    async def release_break_glass(self, pipeline: str, requester: str, approval_id: str) -> None:
        """The request could not be made after all: the requester may ask again."""
        key = BREAK_GLASS_KEY.format(pipeline=pipeline, requester=requester)
        await self._delete_if(keys=[key], args=[approval_id])

    # -- the stale-block guard ----------------------------------------------------------

    async def note_blocked(self, pipeline: str, branch: str, number: int, build_id: str) -> None:
        key = BLOCKED_KEY.format(pipeline=pipeline, branch=branch)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {build_id: number})
            pipe.expire(key, GUARD_TTL)
            await pipe.execute()

    async def forget_blocked(self, pipeline: str, branch: str, build_id: str) -> None:
        await self.redis.zrem(BLOCKED_KEY.format(pipeline=pipeline, branch=branch), build_id)

    async def blocked_before(self, pipeline: str, branch: str, number: int) -> list[str]:
        """The ids of the branch's blocked builds older than build `number`."""
        key = BLOCKED_KEY.format(pipeline=pipeline, branch=branch)
        ids = await self.redis.zrangebyscore(key, "-inf", f"({number}")
        return [text(i) for i in ids]

    async def raise_newest(self, pipeline: str, branch: str, newer: SupersededBy) -> SupersededBy:
        """Record `newer` as the branch's newest passed or unblocked build, unless a newer one
        is recorded; returns whichever is kept."""
        kept = await self._raise_newest(
            keys=[NEWEST_KEY.format(pipeline=pipeline, branch=branch)],
            args=[newer.number, newer.model_dump_json(), GUARD_TTL],
        )
        return SupersededBy.model_validate_json(kept)

    async def newest(self, pipeline: str, branch: str) -> SupersededBy | None:
        raw = await self.redis.get(NEWEST_KEY.format(pipeline=pipeline, branch=branch))
        return SupersededBy.model_validate_json(raw) if raw else None

    async def supersede(self, build_id: str, by: SupersededBy, *, lease_until: float) -> bool:
        """Mark a blocked build superseded; True for the one caller that marked it, whose
        follow-up is leased to it until `lease_until` (see `superseded_followups`)."""
        marked = await self._supersede(
            keys=[SUPERSEDED_KEY.format(build_id=build_id), SUPERSEDED_FOLLOWUP_KEY],
            args=[by.model_dump_json(), GUARD_TTL, lease_until, build_id],
        )
        return bool(marked)

    async def superseded_followed_up(self, build_id: str) -> None:
        """The follow-up of a superseded build is done (or will never be possible)."""
        await self.redis.zrem(SUPERSEDED_FOLLOWUP_KEY, build_id)

    async def superseded_followups(self, now: float, *, lease_until: float) -> list[str]:
        """The superseded builds whose follow-up's lease ran out (its process died, or is
        stuck), each handed to one caller only and leased to it until `lease_until`."""
        due = await self.redis.zrangebyscore(SUPERSEDED_FOLLOWUP_KEY, "-inf", now, start=0, num=50)
        taken = []
        for build_id in [text(b) for b in due]:
            took = await self._take_due(
                keys=[SUPERSEDED_FOLLOWUP_KEY], args=[build_id, now, lease_until]
            )
            if took is not None:
                taken.append(build_id)
        return taken

    async def amend_superseded(self, build_id: str, by: SupersededBy) -> None:
        """Replace the mark of a build already superseded (what became of it changed)."""
        key = SUPERSEDED_KEY.format(build_id=build_id)
        await self.redis.set(key, by.model_dump_json(), xx=True, ex=GUARD_TTL)

    async def superseded_by(self, build_id: str) -> SupersededBy | None:
        raw = await self.redis.get(SUPERSEDED_KEY.format(build_id=build_id))
        return SupersededBy.model_validate_json(raw) if raw else None

    async def queue_refresh(self, build_id: str, phase: str, gen: int) -> None:
        """Ask the notifier to bring a build's messages up to date without a change of state
        (a transition from its phase to itself, which no thread reply follows)."""
        await self.redis.xadd(
            EVENTS_STREAM,
            {"build_id": build_id, "from": phase, "to": phase, "gen": str(gen)},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    # -- lock hygiene -------------------------------------------------------------------

    async def claim_lock_reminder(self, lock: PipelineLock, period: int, ttl: int) -> bool:
        """True for the one caller that reminds the holder of `lock` in its `period`-th period."""
        key = LOCK_REMINDED_KEY.format(pipeline=lock.pipeline, since=int(lock.since), period=period)
        return bool(await self.redis.set(key, "1", nx=True, ex=max(ttl, 1)))

    async def index_unindexed_locks(self) -> int:
        """Once a day across replicas, add to the indexes the locks they miss (taken by an
        older release, or by a process that died in between); returns how many it added."""
        if not await self.redis.set(LOCKS_INDEXED_KEY, "1", nx=True, ex=LOCKS_INDEXED_TTL):
            return 0
        added = 0
        async for key in self.redis.scan_iter(match=PIPELINE_LOCK_KEY.format(pipeline="*")):
            raw = await self.redis.get(key)
            if not raw:
                continue
            try:
                lock = PipelineLock.model_validate_json(raw)
            except ValueError:
                continue  # not a lock this release can read: left alone
            new = await self.redis.zadd(LOCKS_HELD_KEY, {lock.pipeline: lock.since}, nx=True)
            added += 1 if new else 0
            if lock.expires_at is not None:
                await self.redis.zadd(LOCK_EXPIRY_KEY, {text(raw): lock.expires_at}, nx=True)
        return added

    async def take_expired_locks(self, now: float, *, lease_until: float) -> list[ExpiredLock]:
        """The locks whose time has come, each handed to one caller only and leased to it until
        `lease_until`, to tell its channel and then call `expiry_told` (a caller that dies, or
        calls `tell_expiry_later`, leaves it to a later sweep). Their key is deleted if it
        still holds that lock (Redis's own expiry may not have struck yet)."""
        taken = []
        for raw in [text(m) for m in await self.redis.zrangebyscore(LOCK_EXPIRY_KEY, "-inf", now)]:
            score = await self._take_due(keys=[LOCK_EXPIRY_KEY], args=[raw, now, lease_until])
            if score is None:
                continue  # another process took it
            try:
                lock = PipelineLock.model_validate_json(raw)
            except ValueError:
                await self.redis.zrem(LOCK_EXPIRY_KEY, raw)  # not a lock this release can read
                continue
            await self._delete_if(
                keys=[PIPELINE_LOCK_KEY.format(pipeline=lock.pipeline)], args=[raw]
            )
            # Its score was its expiry until a first caller took it; a lease, or a try given
            # back, since (both later than the expiry).
            tried = lock.expires_at is not None and float(text(score)) > lock.expires_at
            taken.append(ExpiredLock(lock, tried=tried, entry=raw))
        return taken

    async def expiry_told(self, expired: ExpiredLock) -> None:
        """The channel was told that the lock expired (or never will be): no one tries again."""
        await self.redis.zrem(LOCK_EXPIRY_KEY, expired.entry)

    async def tell_expiry_later(self, expired: ExpiredLock, now: float) -> None:
        """Telling of the lock's expiry failed for now: the next sweep (of any replica) tries,
        as a retry (its score stays later than the expiry)."""
        expires_at = expired.lock.expires_at or 0.0
        score = max(now, math.nextafter(expires_at, math.inf))
        await self.redis.zadd(LOCK_EXPIRY_KEY, {expired.entry: score}, xx=True)
