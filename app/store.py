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

# The braces are a Redis Cluster hash tag: every key of the bot lives in one slot, so the Lua
# scripts and transactions that touch several keys also work on a cluster.
PREFIX = "{bkchatops}:"
#: PREFIX as it must be written in key templates filled in with str.format.
TEMPLATE_PREFIX = PREFIX.replace("{", "{{").replace("}", "}}")

#: build:{build_id} -> hash (see TrackedBuild and the fields written by OBSERVE).
BUILD_KEY = TEMPLATE_PREFIX + "build:{build_id}"
#: msgs:{build_id} -> hash channel -> JSON of that channel's message about the build.
MESSAGES_KEY = TEMPLATE_PREFIX + "msgs:{build_id}"
#: bynum:{pipeline}:{number} -> build id, to find a tracked build from a command or URL.
BY_NUMBER_KEY = TEMPLATE_PREFIX + "bynum:{pipeline}:{number}"
#: Sorted set of builds still being followed; the score is when they were last observed.
PENDING_KEY = PREFIX + "pending"
#: Stream of transitions waiting to be turned into Slack messages, consumed by a group.
EVENTS_STREAM = PREFIX + "events"
EVENTS_GROUP = "notifiers"
#: req:{id} -> who claimed a mutation request (SET NX), so a duplicate does nothing.
REQUEST_KEY = TEMPLATE_PREFIX + "req:{request_id}"
#: posted:{build_id}:{channel}:{gen}:{kind} -> set once a thread reply was posted there.
POSTED_KEY = TEMPLATE_PREFIX + "posted:{build_id}:{channel}:{gen}:{kind}"
#: once:{build_id}:{gen}:{what} -> set once a per-build action (an auto-retry) was taken.
ONCE_KEY = TEMPLATE_PREFIX + "once:{build_id}:{gen}:{what}"
#: post:{key} -> when a keyed Slack post was first attempted (unix time), until it is recorded.
POST_ATTEMPT_KEY = TEMPLATE_PREFIX + "post:{key}"
#: outcome:{pipeline}:{branch} -> the final state of the branch's last finished build.
OUTCOME_KEY = TEMPLATE_PREFIX + "outcome:{pipeline}:{branch}"
#: retries:{pipeline}:{hour} -> automatic retries spent in that hour (the hourly budget).
RETRY_BUDGET_KEY = TEMPLATE_PREFIX + "retries:{pipeline}:{hour}"
#: Sorted set of "pipeline#number" that passed after a retry (the flaky signal), by time.
FLAKY_KEY = PREFIX + "flaky"
#: lock:{build_id} -> the process currently writing this build's Slack messages.
BUILD_LOCK_KEY = TEMPLATE_PREFIX + "lock:{build_id}"
#: The poller's lease, so that one process polls Buildkite per cycle.
POLL_LEASE_KEY = PREFIX + "poll:lease"
#: Hash of the poller's state, shared by every process (see PollState).
POLL_STATE_KEY = PREFIX + "poll:state"

#: pipelock:{pipeline} -> JSON of the deploy lock on a pipeline (optional expiry).
PIPELINE_LOCK_KEY = TEMPLATE_PREFIX + "pipelock:{pipeline}"
#: deployreq:{id} -> JSON of a deploy waiting for its requester's confirmation.
DEPLOY_REQUEST_KEY = TEMPLATE_PREFIX + "deployreq:{request_id}"
#: approval:{id} -> hash of a deploy waiting for a second person's approval.
APPROVAL_KEY = TEMPLATE_PREFIX + "approval:{approval_id}"
#: Approvals by expiry time, so that expired ones get their message updated.
APPROVAL_EXPIRY_KEY = PREFIX + "approvals:expiring"
#: Stream of audit entries (bounded).
AUDIT_STREAM = PREFIX + "audit"

PENDING_TTL = 30 * 24 * 3600  # a build may sit on a block step for weeks
FINAL_TTL = 7 * 24 * 3600  # keep finished builds around for /rebuild threading and buttons
REQUEST_TTL = 24 * 3600
ACTION_TTL = 30  # double clicks on one button within this window do one thing
POSTED_TTL = PENDING_TTL
LOCK_TTL_MS = 30_000  # renewed every third of it while held
DEPLOY_REQUEST_TTL = 15 * 60  # a confirmation left unanswered this long is forgotten
APPROVAL_KEEP = 24 * 3600  # an approval's record outlives its expiry by this much
AUDIT_MAXLEN = 10_000
EVENTS_MAXLEN = 100_000

#: A build's rank once it is final; see tracker.phase_of for the others.
FINAL_RANK = 6
#: What `observe` returns when a build seems to have gone back to an earlier phase.
REGRESSED = "!regressed"

# Compare-and-set of a build's phase. Only the process whose call changes the phase emits the
# transition, so a change seen by a webhook, a poll and an API answer at once is emitted once.
# A phase only moves forward (a late webhook cannot undo a newer state); a seemingly earlier
# phase is reported as REGRESSED so the tracker can confirm it with Buildkite and `reset` first.
# A call for a build that is no longer tracked also drops it from the pending set.
_OBSERVE = """
local key, pending, stream, msgs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local build_id, phase, rank = ARGV[1], ARGV[2], tonumber(ARGV[3])
local snapshot, final, now = ARGV[4], ARGV[5], ARGV[6]
local final_rank = tonumber(ARGV[11])
if redis.call('EXISTS', key) == 0 then
  redis.call('ZREM', pending, build_id)
  return false
end
local old = redis.call('HGET', key, 'phase')
local old_rank = tonumber(redis.call('HGET', key, 'rank') or '0')
if old == phase or rank <= old_rank then
  if old_rank < final_rank then
    redis.call('ZADD', pending, now, build_id)
    redis.call('EXPIRE', key, ARGV[10])
    redis.call('EXPIRE', msgs, ARGV[10])
  end
  if old == phase then return false end
  return ARGV[12]
end
redis.call('HSET', key, 'phase', phase, 'rank', rank, 'snapshot', snapshot, 'updated', now,
           'blocked', ARGV[7])
local gen = redis.call('HGET', key, 'gen') or '0'
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[8], '*', 'build_id', build_id,
           'from', old or '', 'to', phase, 'gen', gen)
if final == '1' then
  redis.call('ZREM', pending, build_id)
  redis.call('EXPIRE', key, ARGV[9])
  redis.call('EXPIRE', msgs, ARGV[9])
else
  redis.call('ZADD', pending, now, build_id)
  redis.call('EXPIRE', key, ARGV[10])
  redis.call('EXPIRE', msgs, ARGV[10])
end
return old or ''
"""

# Start tracking a build in a channel: the build's record (once), its number index, and the
# channel's message entry (once per channel). A channel joining a build already followed gets a
# transition of its own so that its message is posted; a new build gets its first one from OBSERVE.
_TRACK = """
local key, bynum, msgs, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local created = 0
if redis.call('EXISTS', key) == 0 then
  local fields = cjson.decode(ARGV[1])
  for name, value in pairs(fields) do redis.call('HSET', key, name, value) end
  redis.call('EXPIRE', key, ARGV[4])
  redis.call('SET', bynum, fields['build_id'], 'EX', ARGV[4])
  created = 1
end
local added = redis.call('HSETNX', msgs, ARGV[2], ARGV[3])
if redis.call('TTL', msgs) < 0 then redis.call('EXPIRE', msgs, ARGV[4]) end
if added == 1 and created == 0 then
  local phase = redis.call('HGET', key, 'phase') or ''
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[5], '*', 'build_id',
             redis.call('HGET', key, 'build_id'), 'from', phase, 'to', phase,
             'gen', redis.call('HGET', key, 'gen') or '0', 'channel', ARGV[2])
end
return created * 2 + added
"""

# Let a build's phase move back (it left a block step, or a finished build's jobs were retried).
_RESET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[1] == '1' then redis.call('HINCRBY', KEYS[1], 'gen', 1) end
redis.call('HSET', KEYS[1], 'rank', '0')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return tonumber(redis.call('HGET', KEYS[1], 'gen'))
"""

# Extend a lock only while we still hold it.
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Decide a pending approval once: the first approve/reject wins, and nothing wins after expiry.
_DECIDE_APPROVAL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'pending' then return status end
if tonumber(ARGV[3]) >= tonumber(redis.call('HGET', KEYS[1], 'expires_at')) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  redis.call('ZREM', KEYS[2], ARGV[4])
  return 'expired!'
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'decided_by', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[4])
return 'ok'
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class MessageTarget(BaseModel):
    """One channel's message about a build: who asked (if anyone) and where it lives."""

    model_config = ConfigDict(extra="ignore")

    channel: str
    #: The Slack user who started it from Slack; None for a build announced by routing.
    requester: str | None = None
    #: The Slack thread this message lives in (a rebuild joins its original's thread).
    thread_ts: str | None = None
    #: The message itself, once posted.
    ts: str | None = None
    #: A digest of the message as last sent, so an unchanged message is not edited again.
    rendered: str = ""
    #: The requester's response_url, to tell them if the message cannot be posted.
    notify_url: str | None = None
    #: A notification route's name, for messages announced by routing.
    route: str | None = None

    @property
    def reply_thread(self) -> str | None:
        return self.thread_ts or self.ts


class TrackedBuild(BaseModel):
    """What the bot remembers about a build it follows, and its messages (one per channel)."""

    model_config = ConfigDict(extra="ignore")

    build_id: str
    pipeline: str
    number: int
    phase: str = ""
    gen: int = 0
    snapshot: dict[str, Any] = {}
    #: The build's jobs were retried from Slack (by a person or automatically).
    retried: bool = False
    targets: list[MessageTarget] = []

    def target(self, channel: str) -> MessageTarget | None:
        return next((t for t in self.targets if t.channel == channel), None)


@dataclass(frozen=True)
class PollState:
    """What one poll cycle leaves for the next, whichever process runs it (times: unix seconds)."""

    #: Where the next list of finished builds starts (`finished_from`).
    finished_from: float | None = None
    #: When the last list of active builds was fetched, and when the next one is due.
    active_at: float | None = None
    active_due: float | None = None
    #: No poll before this moment (backing off), after `failures` failed cycles in a row.
    resume_at: float | None = None
    failures: int = 0
    #: Why the poller is backing off; empty when it is not.
    backoff: str = ""


@dataclass(frozen=True)
class Transition:
    """One change of a tracked build's phase, read from the events stream.

    `channel` is set when only that channel's message is concerned (it just joined the build).
    """

    entry_id: str
    build_id: str
    old: str
    new: str
    gen: int
    channel: str | None = None


class Store:
    """A small typed layer over `redis.asyncio` holding all tracking state."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._observe = client.register_script(_OBSERVE)
        self._release = client.register_script(_RELEASE_LOCK)
        self._decide = client.register_script(_DECIDE_APPROVAL)
        self._track = client.register_script(_TRACK)
        self._reset = client.register_script(_RESET)
        self._renew = client.register_script(_RENEW_LOCK)

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
        build_id: str,
        *,
        pipeline: str,
        number: int,
        target: MessageTarget,
        phase: str,
        rank: int,
        snapshot: Mapping[str, Any],
        final: bool,
    ) -> bool:
        """Follow a build with a message in `target.channel`; False if that channel has one."""
        fields = {
            "build_id": build_id,
            "pipeline": pipeline,
            "number": str(number),
            "phase": "",
            "rank": "0",
            "gen": "0",
            "blocked": "0",
            "retried": "0",
            "snapshot": "{}",
        }
        result = int(
            await self._track(
                keys=[
                    BUILD_KEY.format(build_id=build_id),
                    BY_NUMBER_KEY.format(pipeline=pipeline, number=number),
                    MESSAGES_KEY.format(build_id=build_id),
                    EVENTS_STREAM,
                ],
                args=[
                    json.dumps(fields),
                    target.channel,
                    target.model_dump_json(exclude_none=True),
                    PENDING_TTL,
                    EVENTS_MAXLEN,
                ],
            )
        )
        created, added = result >= 2, result % 2 == 1
        if created:
            await self.observe(
                build_id, phase=phase, rank=rank, snapshot=snapshot, final=final, blocked=False
            )
        return added

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
        """Record a build's phase; returns the previous phase when this call changed it.

        Returns REGRESSED when the phase given is earlier than the one recorded (nothing changed).
        """
        result = await self._observe(
            keys=[
                BUILD_KEY.format(build_id=build_id),
                PENDING_KEY,
                EVENTS_STREAM,
                MESSAGES_KEY.format(build_id=build_id),
            ],
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
                FINAL_RANK,
                REGRESSED,
            ],
        )
        if result is None:
            return None
        return result.decode() if isinstance(result, bytes) else str(result)

    async def reset(self, build_id: str, *, new_generation: bool) -> int | None:
        """Let the build's phase move back; a new generation re-arms its thread replies.

        Used when Buildkite confirms a build left a block step, or a finished build runs again.
        Returns the build's generation, or None if it is not tracked.
        """
        gen = await self._reset(
            keys=[BUILD_KEY.format(build_id=build_id), PENDING_KEY],
            args=["1" if new_generation else "0", time.time(), build_id, PENDING_TTL],
        )
        return None if int(gen) < 0 else int(gen)

    async def forget_pending(self, build_id: str) -> None:
        """Stop following a build (its record is gone or Buildkite no longer knows it)."""
        await self.redis.zrem(PENDING_KEY, build_id)

    async def get(self, build_id: str) -> TrackedBuild | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(BUILD_KEY.format(build_id=build_id))
            pipe.hgetall(MESSAGES_KEY.format(build_id=build_id))
            raw, msgs = await pipe.execute()
        if not raw or b"pipeline" not in raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        targets = [MessageTarget.model_validate_json(v) for v in msgs.values()]
        return TrackedBuild(
            build_id=data["build_id"],
            pipeline=data["pipeline"],
            number=int(data["number"]),
            phase=data.get("phase", ""),
            gen=int(data.get("gen") or 0),
            snapshot=json.loads(data.get("snapshot") or "{}"),
            retried=data.get("retried") == "1",
            targets=sorted(targets, key=lambda t: t.channel),
        )

    async def find(self, pipeline: str, number: int) -> TrackedBuild | None:
        build_id = await self.redis.get(BY_NUMBER_KEY.format(pipeline=pipeline, number=number))
        if build_id is None:
            return None
        return await self.get(_text(build_id))

    async def save_target(self, build_id: str, target: MessageTarget) -> None:
        """Remember a channel message's ts and what it shows (callers hold the build's lock)."""
        await self.redis.hset(
            MESSAGES_KEY.format(build_id=build_id),
            target.channel,
            target.model_dump_json(exclude_none=True),
        )

    async def mark_retried(self, build_id: str) -> None:
        await self.redis.hset(BUILD_KEY.format(build_id=build_id), "retried", "1")

    async def count_auto_retry(self, build_id: str) -> int:
        """Count one more automatic retry of this build; returns the attempt number."""
        return int(await self.redis.hincrby(BUILD_KEY.format(build_id=build_id), "auto_retries", 1))

    async def delivery_count(self, entry_id: str) -> int:
        """How many times a transition was handed to a reader (it grows with each reclaim)."""
        info: Any = await self.redis.xpending_range(
            EVENTS_STREAM, EVENTS_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 0

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

    async def was_posted(self, build_id: str, channel: str, gen: int, kind: str) -> bool:
        key = POSTED_KEY.format(build_id=build_id, channel=channel, gen=gen, kind=kind)
        return bool(await self.redis.exists(key))

    async def mark_posted(self, build_id: str, channel: str, gen: int, kind: str) -> None:
        key = POSTED_KEY.format(build_id=build_id, channel=channel, gen=gen, kind=kind)
        await self.redis.set(key, "1", ex=POSTED_TTL)

    async def once(self, build_id: str, gen: int, what: str) -> bool:
        """True the first time it is called for this build, generation and action."""
        key = ONCE_KEY.format(build_id=build_id, gen=gen, what=what)
        return bool(await self.redis.set(key, "1", nx=True, ex=POSTED_TTL))

    async def begin_post(self, key: str, now: float) -> float | None:
        """Note that a keyed Slack post is about to be made; returns when an earlier attempt was
        made if one was never recorded as done (it may have reached Slack: look before posting).
        """
        redis_key = POST_ATTEMPT_KEY.format(key=key)
        if await self.redis.set(redis_key, repr(now), nx=True, ex=POSTED_TTL):
            return None
        earlier = await self.redis.get(redis_key)
        return float(_text(earlier)) if earlier is not None else None

    async def end_post(self, key: str) -> None:
        """The keyed post is made and recorded: forget the attempt."""
        await self.redis.delete(POST_ATTEMPT_KEY.format(key=key))

    async def swap_outcome(self, pipeline: str, branch: str, state: str) -> str | None:
        """Record the branch's latest final state; returns the one before it."""
        key = OUTCOME_KEY.format(pipeline=pipeline, branch=branch)
        previous = await self.redis.set(key, state, get=True, ex=FINAL_TTL * 4)
        return _text(previous) if previous is not None else None

    async def spend_retry_budget(self, pipeline: str, budget: int, now: float) -> int | None:
        """Take one automatic retry from the pipeline's hourly budget; None when it is spent."""
        key = RETRY_BUDGET_KEY.format(pipeline=pipeline, hour=int(now // 3600))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 7200)
            used, _ = await pipe.execute()
        return int(used) if int(used) <= budget else None

    async def record_flaky(self, pipeline: str, number: int, when: float) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(FLAKY_KEY, {f"{pipeline}#{number}": when})
            pipe.zremrangebyscore(FLAKY_KEY, "-inf", when - 30 * 86400)
            await pipe.execute()

    async def flaky_since(self, since: float) -> list[str]:
        """`pipeline#number` of builds that passed after a retry since `since`."""
        return [_text(m) for m in await self.redis.zrangebyscore(FLAKY_KEY, since, "+inf")]

    async def acquire_lock(self, build_id: str) -> str | None:
        token = uuid.uuid4().hex
        key = BUILD_LOCK_KEY.format(build_id=build_id)
        if await self.redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            return token
        return None

    async def renew_lock(self, build_id: str, token: str) -> bool:
        key = BUILD_LOCK_KEY.format(build_id=build_id)
        return bool(await self._renew(keys=[key], args=[token, LOCK_TTL_MS]))

    async def release_lock(self, build_id: str, token: str) -> None:
        await self._release(keys=[BUILD_LOCK_KEY.format(build_id=build_id)], args=[token])

    async def acquire_poll_lease(self, owner: str, ttl_ms: int) -> bool:
        return bool(await self.redis.set(POLL_LEASE_KEY, owner, nx=True, px=ttl_ms))

    async def poll_state(self) -> PollState:
        raw = {_text(k): _text(v) for k, v in (await self.redis.hgetall(POLL_STATE_KEY)).items()}

        def moment(name: str) -> float | None:
            return float(raw[name]) if raw.get(name) else None

        return PollState(
            finished_from=moment("finished_from"),
            active_at=moment("active_at"),
            active_due=moment("active_due"),
            resume_at=moment("resume_at"),
            failures=int(raw.get("failures") or 0),
            backoff=raw.get("backoff", ""),
        )

    async def save_poll_state(self, **fields: float | int | str) -> None:
        """Set some fields of the poller's state (names as in PollState)."""
        unknown = set(fields) - set(PollState.__dataclass_fields__)
        if unknown:
            raise ValueError(f"not poll state fields: {sorted(unknown)}")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                POLL_STATE_KEY,
                mapping={k: repr(v) if isinstance(v, float) else v for k, v in fields.items()},
            )
            pipe.expire(POLL_STATE_KEY, PENDING_TTL)
            await pipe.execute()

    async def end_poll_backoff(self) -> None:
        await self.redis.hdel(POLL_STATE_KEY, "resume_at", "failures", "backoff")

    # -- deploy locks ----------------------------------------------------------------------

    async def lock_pipeline(
        self, pipeline: str, *, user: str, reason: str, ttl: int | None, now: float
    ) -> dict[str, Any] | None:
        """Take the deploy lock; None if taken now, else the current holder's lock."""
        key = PIPELINE_LOCK_KEY.format(pipeline=pipeline)
        lock = {
            "pipeline": pipeline,
            "user": user,
            "reason": reason,
            "since": now,
            "expires_at": now + ttl if ttl else None,
        }
        if await self.redis.set(key, json.dumps(lock), nx=True, ex=ttl):
            return None
        current = await self.pipeline_lock(pipeline)
        return current or await self.lock_pipeline(
            pipeline, user=user, reason=reason, ttl=ttl, now=now
        )

    async def pipeline_lock(self, pipeline: str) -> dict[str, Any] | None:
        raw = await self.redis.get(PIPELINE_LOCK_KEY.format(pipeline=pipeline))
        return json.loads(raw) if raw else None

    async def unlock_pipeline(self, pipeline: str) -> bool:
        return bool(await self.redis.delete(PIPELINE_LOCK_KEY.format(pipeline=pipeline)))

    async def pipeline_locks(self) -> list[dict[str, Any]]:
        locks = []
        async for key in self.redis.scan_iter(match=PIPELINE_LOCK_KEY.format(pipeline="*")):
            raw = await self.redis.get(key)
            if raw:
                locks.append(json.loads(raw))
        return sorted(locks, key=lambda lock: str(lock["pipeline"]))

    # -- confirmations and approvals --------------------------------------------------------

    async def save_deploy_request(self, request_id: str, data: Mapping[str, Any]) -> None:
        key = DEPLOY_REQUEST_KEY.format(request_id=request_id)
        await self.redis.set(key, json.dumps(data), ex=DEPLOY_REQUEST_TTL)

    async def take_deploy_request(self, request_id: str) -> dict[str, Any] | None:
        """Read and forget a deploy request, so that it is acted on once."""
        raw = await self.redis.getdel(DEPLOY_REQUEST_KEY.format(request_id=request_id))
        return json.loads(raw) if raw else None

    async def create_approval(
        self, approval_id: str, data: Mapping[str, Any], *, expires_at: float
    ) -> None:
        key = APPROVAL_KEY.format(approval_id=approval_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "request": json.dumps(data),
                    "status": "pending",
                    "expires_at": repr(expires_at),
                    "ts": "",
                    "channel": "",
                },
            )
            pipe.expireat(key, int(expires_at + APPROVAL_KEEP))
            pipe.zadd(APPROVAL_EXPIRY_KEY, {approval_id: expires_at})
            await pipe.execute()

    async def set_approval_message(self, approval_id: str, *, channel: str, ts: str) -> None:
        key = APPROVAL_KEY.format(approval_id=approval_id)
        await self.redis.hset(key, mapping={"channel": channel, "ts": ts})

    async def approval(self, approval_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(APPROVAL_KEY.format(approval_id=approval_id))
        if not raw:
            return None
        data: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        data["request"] = json.loads(data["request"])
        data["expires_at"] = float(data["expires_at"])
        return data

    async def decide_approval(self, approval_id: str, *, status: str, user: str, now: float) -> str:
        """'ok' when this call decided it; else 'approved'/'rejected'/'expired'/'missing'.

        'expired!' means this very call found it expired (so its message needs updating).
        """
        result = await self._decide(
            keys=[APPROVAL_KEY.format(approval_id=approval_id), APPROVAL_EXPIRY_KEY],
            args=[status, user, now, approval_id],
        )
        return _text(result)

    async def due_approvals(self, now: float) -> list[str]:
        return [_text(i) for i in await self.redis.zrangebyscore(APPROVAL_EXPIRY_KEY, "-inf", now)]

    # -- audit ------------------------------------------------------------------------------

    async def audit(self, entry: Mapping[str, str]) -> None:
        fields: dict[Any, Any] = dict(entry)
        await self.redis.xadd(AUDIT_STREAM, fields, maxlen=AUDIT_MAXLEN, approximate=True)

    async def audit_entries(self, *, pipeline: str | None, limit: int) -> list[dict[str, str]]:
        """The latest audit entries, newest first, optionally for one pipeline."""
        found: list[dict[str, str]] = []
        last = "+"
        while len(found) < limit:
            batch: Any = await self.redis.xrevrange(AUDIT_STREAM, max=last, count=200)
            if not batch:
                break
            for _entry_id, fields in batch:
                entry = {_text(k): _text(v) for k, v in fields.items()}
                if pipeline is None or entry.get("pipeline") == pipeline:
                    found.append(entry)
                    if len(found) >= limit:
                        break
            last = "(" + _text(batch[-1][0])
        return found


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
                channel=f.get("channel") or None,
            )
        )
    return out
