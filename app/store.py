"""Everything the bot keeps in Redis: key names, TTLs and atomic scripts, in one place.

Tracking state is shared by every bot process on the same Redis, so every decision that must be
taken once (a state transition, a thread reply, a mutation) is taken here atomically.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict

PREFIX = "bkchatops:"

#: build:{build_id} -> hash (see TrackedBuild and the fields written by OBSERVE).
BUILD_KEY = PREFIX + "build:{build_id}"
#: bynum:{pipeline}:{number} -> build id, to find a tracked build from a command or URL.
BY_NUMBER_KEY = PREFIX + "bynum:{pipeline}:{number}"
#: Sorted set of builds still being followed; the score is when they were last observed.
PENDING_KEY = PREFIX + "pending"
#: Stream of transitions waiting to be turned into Slack messages, consumed by a group.
EVENTS_STREAM = PREFIX + "events"
EVENTS_GROUP = "notifiers"
#: req:{id} -> who claimed a mutation request (SET NX), so a duplicate does nothing.
REQUEST_KEY = PREFIX + "req:{request_id}"
#: posted:{build_id}:{gen}:{kind} -> set once a thread reply was posted.
POSTED_KEY = PREFIX + "posted:{build_id}:{gen}:{kind}"
#: lock:{build_id} -> the process currently writing this build's Slack messages.
BUILD_LOCK_KEY = PREFIX + "lock:{build_id}"
#: The poller's lease, so that one process polls Buildkite per cycle.
POLL_LEASE_KEY = PREFIX + "poll:lease"
#: When the last poll cycle started (unix seconds), to bound `finished_from`.
POLL_LAST_KEY = PREFIX + "poll:last"

PENDING_TTL = 30 * 24 * 3600  # a build may sit on a block step for weeks
FINAL_TTL = 7 * 24 * 3600  # keep finished builds around for /rebuild threading and buttons
REQUEST_TTL = 24 * 3600
ACTION_TTL = 30  # double clicks on one button within this window do one thing
POSTED_TTL = PENDING_TTL
LOCK_TTL_MS = 30_000
EVENTS_MAXLEN = 100_000

# Compare-and-set of a build's phase. Only the process whose call changes the phase emits the
# transition, so a change seen by a webhook, a poll and an API answer at once is emitted once.
# A phase never moves backwards (a late webhook cannot undo a newer state) except out of a block
# step, or after `reopen` when the bot itself retried jobs of a finished build.
_OBSERVE = """
local key, pending, stream = KEYS[1], KEYS[2], KEYS[3]
local build_id, phase, rank = ARGV[1], ARGV[2], tonumber(ARGV[3])
local snapshot, final, now = ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', key) == 0 then return false end
local old = redis.call('HGET', key, 'phase')
local old_rank = tonumber(redis.call('HGET', key, 'rank') or '0')
local blocked_before = redis.call('HGET', key, 'blocked') == '1'
if old == phase then
  if final ~= '1' then redis.call('ZADD', pending, now, build_id) end
  return false
end
if not (rank > old_rank or (blocked_before and old_rank < 5)) then
  if final ~= '1' and old_rank < 5 then redis.call('ZADD', pending, now, build_id) end
  return false
end
redis.call('HSET', key, 'phase', phase, 'rank', rank, 'snapshot', snapshot, 'updated', now,
           'blocked', ARGV[7])
local gen = redis.call('HGET', key, 'gen') or '0'
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[8], '*', 'build_id', build_id,
           'from', old or '', 'to', phase, 'gen', gen)
if final == '1' then
  redis.call('ZREM', pending, build_id)
  redis.call('EXPIRE', key, ARGV[9])
else
  redis.call('ZADD', pending, now, build_id)
  redis.call('EXPIRE', key, ARGV[10])
end
return old or ''
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class TrackedBuild(BaseModel):
    """What the bot remembers about a build it follows, besides its latest snapshot."""

    model_config = ConfigDict(extra="ignore")

    build_id: str
    pipeline: str
    number: int
    channel: str
    requester: str
    #: The Slack thread this build's message lives in (a rebuild joins its original's thread).
    thread_ts: str | None = None
    #: This build's own message, once posted.
    ts: str | None = None
    phase: str = ""
    gen: int = 0
    #: A digest of the message as last sent, so an unchanged message is not edited again.
    rendered: str = ""
    snapshot: dict[str, Any] = {}

    @property
    def reply_thread(self) -> str | None:
        return self.thread_ts or self.ts


@dataclass(frozen=True)
class Transition:
    """One change of a tracked build's phase, read from the events stream."""

    entry_id: str
    build_id: str
    old: str
    new: str
    gen: int


class Store:
    """A small typed layer over `redis.asyncio` holding all tracking state."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._observe = client.register_script(_OBSERVE)
        self._release = client.register_script(_RELEASE_LOCK)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # -- mutations requested from Slack -------------------------------------------------------

    async def claim_request(
        self, request_id: str, owner: str, ttl: int = REQUEST_TTL
    ) -> str | None:
        """Claim a mutation request; None if claimed now, else who claimed it first."""
        key = REQUEST_KEY.format(request_id=request_id)
        if await self.redis.set(key, owner, nx=True, ex=ttl):
            return None
        previous = await self.redis.get(key)
        return _text(previous or "")

    async def release_request(self, request_id: str) -> None:
        """Forget a claim whose mutation never reached Buildkite, so the user may try again."""
        await self.redis.delete(REQUEST_KEY.format(request_id=request_id))

    # -- tracking ---------------------------------------------------------------------------

    async def track(
        self,
        tracked: TrackedBuild,
        *,
        phase: str,
        rank: int,
        snapshot: Mapping[str, Any],
        final: bool,
    ) -> bool:
        """Start following a build and emit its first transition; False if already tracked."""
        key = BUILD_KEY.format(build_id=tracked.build_id)
        fields: dict[Any, Any] = {
            "build_id": tracked.build_id,
            "pipeline": tracked.pipeline,
            "number": str(tracked.number),
            "channel": tracked.channel,
            "requester": tracked.requester,
            "thread_ts": tracked.thread_ts or "",
            "ts": "",
            "phase": "",
            "rank": "0",
            "gen": "0",
            "blocked": "0",
            "snapshot": "{}",
        }
        created = await self.redis.hsetnx(key, "build_id", tracked.build_id)
        if not created:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, PENDING_TTL)
            pipe.set(
                BY_NUMBER_KEY.format(pipeline=tracked.pipeline, number=tracked.number),
                tracked.build_id,
                ex=PENDING_TTL,
            )
            await pipe.execute()
        await self.observe(
            tracked.build_id,
            phase=phase,
            rank=rank,
            snapshot=snapshot,
            final=final,
            blocked=False,
        )
        return True

    async def observe(
        self,
        build_id: str,
        *,
        phase: str,
        rank: int,
        snapshot: Mapping[str, Any],
        final: bool,
        blocked: bool,
        now: float | None = None,
    ) -> str | None:
        """Record a build's phase; returns the previous phase when this call changed it."""
        result = await self._observe(
            keys=[BUILD_KEY.format(build_id=build_id), PENDING_KEY, EVENTS_STREAM],
            args=[
                build_id,
                phase,
                rank,
                json.dumps(snapshot, separators=(",", ":"), default=str),
                "1" if final else "0",
                now if now is not None else time.time(),
                "1" if blocked else "0",
                EVENTS_MAXLEN,
                FINAL_TTL,
                PENDING_TTL,
            ],
        )
        if result is None:
            return None
        return result.decode() if isinstance(result, bytes) else str(result)

    async def reopen(self, build_id: str) -> int:
        """Let a finished build be followed again (its jobs were retried); returns the new gen."""
        key = BUILD_KEY.format(build_id=build_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "gen", 1)
            pipe.hset(key, mapping={"rank": "0", "phase": "reopened"})
            pipe.zadd(PENDING_KEY, {build_id: time.time()})
            pipe.expire(key, PENDING_TTL)
            results = await pipe.execute()
        return int(results[0])

    async def get(self, build_id: str) -> TrackedBuild | None:
        raw = await self.redis.hgetall(BUILD_KEY.format(build_id=build_id))
        if not raw or b"pipeline" not in raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        return TrackedBuild(
            build_id=data["build_id"],
            pipeline=data["pipeline"],
            number=int(data["number"]),
            channel=data["channel"],
            requester=data["requester"],
            thread_ts=data.get("thread_ts") or None,
            ts=data.get("ts") or None,
            phase=data.get("phase", ""),
            gen=int(data.get("gen") or 0),
            rendered=data.get("rendered", ""),
            snapshot=json.loads(data.get("snapshot") or "{}"),
        )

    async def find(self, pipeline: str, number: int) -> TrackedBuild | None:
        build_id = await self.redis.get(BY_NUMBER_KEY.format(pipeline=pipeline, number=number))
        if build_id is None:
            return None
        return await self.get(_text(build_id))

    async def set_message(self, build_id: str, *, ts: str, rendered: str) -> None:
        """Remember the build message's ts and a digest of what it shows now."""
        await self.redis.hset(
            BUILD_KEY.format(build_id=build_id), mapping={"ts": ts, "rendered": rendered}
        )

    async def pending(
        self, *, seen_before: float | None = None, limit: int | None = None
    ) -> list[str]:
        """Ids of builds still followed; with `seen_before`, only those not observed since."""
        high: float | str = seen_before if seen_before is not None else "+inf"
        if limit is None:
            ids = await self.redis.zrangebyscore(PENDING_KEY, "-inf", high)
        else:
            ids = await self.redis.zrangebyscore(PENDING_KEY, "-inf", high, start=0, num=limit)
        return [_text(i) for i in ids]

    async def pending_count(self) -> int:
        return int(await self.redis.zcard(PENDING_KEY))

    # -- the events stream ------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(EVENTS_STREAM, EVENTS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_transitions(
        self, consumer: str, *, count: int = 20, block_ms: int = 1000
    ) -> list[Transition]:
        reply: Any = await self.redis.xreadgroup(
            EVENTS_GROUP, consumer, {EVENTS_STREAM: ">"}, count=count, block=block_ms
        )
        return [t for _, entries in reply or [] for t in _transitions(entries)]

    async def reclaim_transitions(
        self, consumer: str, *, min_idle_ms: int, count: int = 50
    ) -> list[Transition]:
        """Take over transitions that another (probably dead) process read but never finished."""
        reply: Any = await self.redis.xautoclaim(
            EVENTS_STREAM, EVENTS_GROUP, consumer, min_idle_time=min_idle_ms, count=count
        )
        return _transitions(reply[1])

    async def ack_transition(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(EVENTS_STREAM, EVENTS_GROUP, entry_id)
            pipe.xdel(EVENTS_STREAM, entry_id)
            await pipe.execute()

    # -- guards and locks -------------------------------------------------------------------

    async def was_posted(self, build_id: str, gen: int, kind: str) -> bool:
        key = POSTED_KEY.format(build_id=build_id, gen=gen, kind=kind)
        return bool(await self.redis.exists(key))

    async def mark_posted(self, build_id: str, gen: int, kind: str) -> None:
        key = POSTED_KEY.format(build_id=build_id, gen=gen, kind=kind)
        await self.redis.set(key, "1", ex=POSTED_TTL)

    async def acquire_lock(self, build_id: str) -> str | None:
        token = uuid.uuid4().hex
        key = BUILD_LOCK_KEY.format(build_id=build_id)
        if await self.redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            return token
        return None

    async def release_lock(self, build_id: str, token: str) -> None:
        await self._release(keys=[BUILD_LOCK_KEY.format(build_id=build_id)], args=[token])

    async def acquire_poll_lease(self, owner: str, ttl_ms: int) -> bool:
        return bool(await self.redis.set(POLL_LEASE_KEY, owner, nx=True, px=ttl_ms))

    async def last_poll(self) -> float | None:
        value = await self.redis.get(POLL_LAST_KEY)
        return float(value) if value is not None else None

    async def set_last_poll(self, when: float) -> None:
        await self.redis.set(POLL_LAST_KEY, repr(when), ex=PENDING_TTL)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _transitions(entries: Sequence[Any]) -> list[Transition]:
    out = []
    for entry_id, fields in entries:
        if not fields:  # deleted while pending
            continue
        f = {_text(k): _text(v) for k, v in cast(dict[bytes, bytes], fields).items()}
        out.append(
            Transition(
                entry_id=_text(entry_id),
                build_id=f["build_id"],
                old=f.get("from", ""),
                new=f["to"],
                gen=int(f.get("gen") or 0),
            )
        )
    return out
