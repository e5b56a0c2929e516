"""Everything the bot keeps in Redis: key names, TTLs and atomic scripts, in one place.

Tracking state is shared by every bot process on the same Redis, so every decision that must be
taken once (a state transition, a thread reply, a mutation) is taken here atomically.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict
from redis.commands.core import AsyncScript

from buildkite.webhooks import SIGNATURE_TOLERANCE, Signature

# The braces are a Redis Cluster hash tag: every key of the bot lives in one slot, so the Lua
# scripts and transactions that touch several keys also work on a cluster.
PREFIX = "{bkchatops}:"
#: PREFIX as it must be written in key templates filled in with str.format.
TEMPLATE_PREFIX = PREFIX.replace("{", "{{").replace("}", "}}")

#: build:{build_id} -> the build's record: one compact JSON string (see `_encode_record`), with
#: its phase, generation, snapshot, one message per channel and its posted/once markers, so that a
#: tracked build costs one key plus its number index. A string has no small/large encoding cliff
#: (a hash turns into a hashtable as soon as one value passes hash-max-listpack-value, 64 bytes).
BUILD_KEY = TEMPLATE_PREFIX + "build:{build_id}"
#: bynum:{pipeline}:{number} -> build id, to find a tracked build from a command or URL. It lives
#: exactly as long as the build's record (the scripts extend both together).
BY_NUMBER_KEY = TEMPLATE_PREFIX + "bynum:{pipeline}:{number}"
#: Sorted set of builds still being followed; the score is when they were last observed.
PENDING_KEY = PREFIX + "pending"
#: Stream of transitions waiting to be turned into Slack messages, consumed by a group.
EVENTS_STREAM = PREFIX + "events"
EVENTS_GROUP = "notifiers"
#: req:{id} -> who claimed a mutation request (SET NX), so a duplicate does nothing.
REQUEST_KEY = TEMPLATE_PREFIX + "req:{request_id}"
#: webhook:{timestamp}:{signature} -> a signed Buildkite webhook already received (SET NX), so a
#: replay of it within its signature's tolerance does nothing.
WEBHOOK_KEY = TEMPLATE_PREFIX + "webhook:{timestamp}:{signature}"
#: click:{id} -> a button click already handled (SET NX), by its identity: action_ts, message and
#: user. A signed click delivered again within Slack's signature window is dropped.
CLICK_KEY = TEMPLATE_PREFIX + "click:{click_id}"
#: Markers kept in the build's record: a thread reply was posted, or a per-build action (an
#: auto-retry) was taken, once per generation.
POSTED_MARK = "{channel}:{gen}:{kind}"
ONCE_MARK = "{gen}:{what}"
#: The layout before records were one string: a hash at BUILD_KEY, its messages in a hash, and a
#: key per marker. Such a build is converted to a record the first time it is touched.
LEGACY_MESSAGES_KEY = TEMPLATE_PREFIX + "msgs:{build_id}"
LEGACY_POSTED_KEY = TEMPLATE_PREFIX + "posted:{build_id}:{channel}:{gen}:{kind}"
LEGACY_ONCE_KEY = TEMPLATE_PREFIX + "once:{build_id}:{gen}:{what}"
#: Hash of request id -> JSON of a build the bot asked for without (yet) an answer (see
#: AwaitedBuild), and a sorted set of the same ids by when the poller should look for it.
AWAITED_KEY = PREFIX + "awaited"
AWAITED_DUE_KEY = PREFIX + "awaited:due"
#: post:{key} -> when a keyed Slack post was first attempted (unix time), until it is recorded
#: (deleted then, so it costs nothing once the post is made).
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
#: A signature is accepted up to SIGNATURE_TOLERANCE (300 s) either side of its timestamp, so a
#: delivery can be replayed for up to 600 s after it arrives; a minute more covers clock skew
#: between replicas.
WEBHOOK_TTL = 2 * SIGNATURE_TOLERANCE + 60
CLICK_TTL = 6 * 60  # Slack's 5-minute signature window plus a minute of clock skew
LOCK_TTL_MS = 30_000  # renewed every third of it while held
DEPLOY_REQUEST_TTL = 15 * 60  # a confirmation left unanswered this long is forgotten
APPROVAL_KEEP = 24 * 3600  # an approval's record outlives its expiry by this much
#: How long a build asked for without an answer is looked for: Buildkite creates one within
#: minutes or not at all. Both awaited keys are given this TTL again on every write.
AWAITED_TTL = 3600
AUDIT_MAXLEN = 10_000
EVENTS_MAXLEN = 100_000

#: A build's rank once it is final; see tracker.phase_of for the others.
FINAL_RANK = 6
#: What `observe` returns when a build seems to have gone back to an earlier phase.
REGRESSED = "!regressed"

# Every script on a build's record starts with this. `load` returns the decoded record, or 'none'
# when there is none, or 'hash' for a record of the legacy layout (the caller converts it and runs
# the script again). `save` keeps the key's TTL unless given one; `expire` sets the TTL of the
# record and of its number index together. The index's name is built here from the record (its
# template is an argument), in the same Cluster slot as every key of the bot.
_RECORD_LUA = """
local function load(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'string' then return kind end
  return cjson.decode(redis.call('GET', key))
end
local function save(key, rec, ttl)
  if ttl then return redis.call('SET', key, cjson.encode(rec), 'EX', ttl) end
  return redis.call('SET', key, cjson.encode(rec), 'KEEPTTL')
end
local function expire(key, rec, bynum_template, ttl)
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', string.format(bynum_template, rec.p, rec.n), ttl)
end
"""

# Compare-and-set of a build's phase. Only the process whose call changes the phase emits the
# transition, so a change seen by a webhook, a poll and an API answer at once is emitted once.
# A phase only moves forward (a late webhook cannot undo a newer state); a seemingly earlier
# phase is reported as REGRESSED so the tracker can confirm it with Buildkite and `reset` first.
# A call for a build that is no longer tracked also drops it from the pending set.
_OBSERVE = (
    _RECORD_LUA
    + """
local key, pending, stream = KEYS[1], KEYS[2], KEYS[3]
local build_id, phase, rank = ARGV[1], ARGV[2], tonumber(ARGV[3])
local snapshot, final, now = ARGV[4], ARGV[5], ARGV[6]
local final_rank, bynum = tonumber(ARGV[10]), ARGV[12]
local rec = load(key)
if rec == 'hash' then return ARGV[13] end
if type(rec) ~= 'table' then
  redis.call('ZREM', pending, build_id)
  return false
end
local old, old_rank = rec.ph, tonumber(rec.r)
if old == phase or rank <= old_rank then
  if old_rank < final_rank then
    redis.call('ZADD', pending, now, build_id)
    expire(key, rec, bynum, ARGV[9])
  end
  if old == phase then return false end
  return ARGV[11]
end
rec.ph, rec.r, rec.s = phase, rank, cjson.decode(snapshot)
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[7], '*', 'build_id', build_id,
           'from', old, 'to', phase, 'gen', rec.g)
local ttl = ARGV[9]
if final == '1' then
  redis.call('ZREM', pending, build_id)
  ttl = ARGV[8]
else
  redis.call('ZADD', pending, now, build_id)
end
save(key, rec, ttl)
expire(key, rec, bynum, ttl)
return old
"""
)

# Start tracking a build in a channel: the build's record (once), its number index, and the
# channel's message entry (once per channel). A channel joining a build already followed gets a
# transition of its own so that its message is posted; a new build gets its first one from OBSERVE.
_TRACK = (
    _RECORD_LUA
    + """
local key, bynum, stream = KEYS[1], KEYS[2], KEYS[3]
local build_id, channel, ttl = ARGV[1], ARGV[3], ARGV[5]
local rec = load(key)
if rec == 'hash' then return ARGV[7] end
local created, added = 0, 0
if type(rec) ~= 'table' then
  rec = cjson.decode(ARGV[2])
  redis.call('SET', bynum, build_id, 'EX', ttl)
  created = 1
end
if rec.m[channel] == nil then
  rec.m[channel] = cjson.decode(ARGV[4])
  added = 1
end
if created == 1 then
  save(key, rec, ttl)
elseif added == 1 then
  save(key, rec)
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[6], '*', 'build_id', build_id,
             'from', rec.ph, 'to', rec.ph, 'gen', rec.g, 'channel', channel)
end
return created * 2 + added
"""
)

# Let a build's phase move back (it left a block step, or a finished build's jobs were retried).
_RESET = (
    _RECORD_LUA
    + """
local rec = load(KEYS[1])
if rec == 'hash' then return ARGV[6] end
if type(rec) ~= 'table' then return -1 end
if ARGV[1] == '1' then rec.g = rec.g + 1 end
rec.r = 0
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
save(KEYS[1], rec, ARGV[4])
expire(KEYS[1], rec, ARGV[5], ARGV[4])
return rec.g
"""
)

# A small change to a build's record, under its current TTL; -1 when the build is not tracked.
# 'target' sets a channel's message; 'mark' sets a marker (1 if this call set it, 0 if it was
# set); 'retried' flags the build as retried; 'count' counts one more auto-retry (the new count).
_AMEND = (
    _RECORD_LUA
    + """
local rec = load(KEYS[1])
if rec == 'hash' then return ARGV[4] end
if type(rec) ~= 'table' then return -1 end
local op, result = ARGV[1], 1
if op == 'target' then
  rec.m[ARGV[2]] = cjson.decode(ARGV[3])
elseif op == 'mark' then
  rec.k = rec.k or {}
  if rec.k[ARGV[2]] then return 0 end
  rec.k[ARGV[2]] = 1
elseif op == 'retried' then
  rec.rt = 1
elseif op == 'count' then
  rec.ar = (rec.ar or 0) + 1
  result = rec.ar
end
save(KEYS[1], rec)
return result
"""
)

# Replace a build's legacy records with its converted record, if no one did it in the meantime
# (KEYS: the legacy hash, its messages hash, then its marker keys; ARGV: the record, or '' for a
# hash that was no record, the phase, rank and generation it was converted from, and a TTL for a
# legacy hash that had none).
_REPLACE_LEGACY = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 1 end
local seen = redis.call('HMGET', KEYS[1], 'phase', 'rank', 'gen')
if (seen[1] or '') ~= ARGV[2] or (seen[2] or '0') ~= ARGV[3] or (seen[3] or '0') ~= ARGV[4] then
  return 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then ttl = tonumber(ARGV[5]) * 1000 end
for _, key in ipairs(KEYS) do redis.call('DEL', key) end
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl) end
return 1
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


class AwaitedBuild(BaseModel):
    """A create or rebuild sent to Buildkite whose build the bot has not seen yet, and where
    its message goes once it appears (whichever process finds it)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    pipeline: str
    #: The build rebuilt, for a rebuild (whose new build names it in `rebuilt_from`); None for
    #: a create (whose build carries `request_id` in its meta_data).
    rebuild_of: int | None = None
    #: When the request was sent (unix time).
    sent_at: float
    #: Given up after this (unix time).
    until: float
    target: MessageTarget


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


#: Short names of the snapshot's fields in a record. Upper case, so that they cannot clash with a
#: field's own name (Buildkite's are snake_case); a field not listed keeps its name.
_SNAPSHOT_NAMES = {
    "id": "I",
    "number": "N",
    "state": "S",
    "blocked": "B",
    "web_url": "U",
    "message": "M",
    "commit": "C",
    "branch": "R",
    "source": "O",
    "author": "A",
    "creator": "K",
    "created_at": "Tc",
    "started_at": "Ts",
    "finished_at": "Tf",
}
_SNAPSHOT_FIELDS = {short: name for name, short in _SNAPSHOT_NAMES.items()}
_PEOPLE = {"author", "creator"}
_TIMES = ("created_at", "started_at", "finished_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Short names of a channel message's fields in a record (the channel is its key there).
_TARGET_NAMES = {
    "requester": "r",
    "thread_ts": "h",
    "ts": "t",
    "rendered": "d",
    "notify_url": "u",
    "route": "o",
}
#: The thread replies and once-actions the tracker marks, looked for when converting a legacy build.
_LEGACY_REPLY_KINDS = ("running", "failing", "final")
_LEGACY_ONCE_ACTIONS = ("final",)
#: What a script answers when it finds a legacy record (it is converted, and the script run again).
_LEGACY = "!legacy"
#: The number index's key as a Lua `string.format` template (the scripts fill it in from a record).
_BY_NUMBER_FORMAT = BY_NUMBER_KEY.format(pipeline="%s", number="%s")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _encode_snapshot(build_id: str, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot as kept in a record: short names, no None values, an `id` that is the build's
    own as "" (it is in the key already), no person's id (messages show names and emails), and
    times to the millisecond as milliseconds since the epoch."""
    out: dict[str, Any] = {}
    for name, value in snapshot.items():
        if value is None:
            continue
        if name in _PEOPLE and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if v is not None and k != "id"}
        elif name == "id" and value == build_id:
            value = ""
        elif name in _TIMES and isinstance(value, str):
            value = _milliseconds(value)
        out[_SNAPSHOT_NAMES.get(name, name)] = value
    return out


def _decode_snapshot(build_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    snapshot = {_SNAPSHOT_FIELDS.get(short, short): value for short, value in data.items()}
    if snapshot.get("id") == "":
        snapshot["id"] = build_id
    for name in _TIMES:
        if isinstance(snapshot.get(name), int):
            moment = _EPOCH + timedelta(milliseconds=snapshot[name])
            snapshot[name] = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return snapshot


def _milliseconds(value: str) -> int | str:
    """An ISO time with a timezone and whole milliseconds as milliseconds since the epoch (13
    digits, exact in Lua's numbers); any other text as it is."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None or moment.microsecond % 1000:
        return value
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _encode_target(target: MessageTarget) -> dict[str, str]:
    fields = ((short, getattr(target, name)) for name, short in _TARGET_NAMES.items())
    return {short: value for short, value in fields if value}


def _decode_target(channel: str, data: Mapping[str, Any]) -> MessageTarget:
    fields = {name: data[short] for name, short in _TARGET_NAMES.items() if short in data}
    return MessageTarget(channel=channel, **fields)


def _mapping(value: Any) -> Mapping[str, Any]:
    """A JSON object of a record; an empty one may come back from Lua's cjson as []."""
    return value if isinstance(value, Mapping) else {}


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
        self._amend = client.register_script(_AMEND)
        self._replace_legacy = client.register_script(_REPLACE_LEGACY)

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

    async def claim_webhook(self, delivery: Signature) -> bool:
        """Claim a signed webhook delivery; False if it was received before (a replay)."""
        key = WEBHOOK_KEY.format(timestamp=delivery.timestamp, signature=delivery.signature)
        return bool(await self.redis.set(key, "1", nx=True, ex=WEBHOOK_TTL))

    async def release_webhook(self, delivery: Signature) -> None:
        """Forget a delivery the bot could not process, so that its redelivery counts."""
        key = WEBHOOK_KEY.format(timestamp=delivery.timestamp, signature=delivery.signature)
        await self.redis.delete(key)

    async def first_click(self, click_id: str) -> bool:
        """Remember a button click; False if this very click was seen before (a replay)."""
        key = CLICK_KEY.format(click_id=click_id)
        return bool(await self.redis.set(key, "1", nx=True, ex=CLICK_TTL))

    async def release_request(self, request_id: str) -> None:
        """Forget a claim whose mutation never reached Buildkite, so the user may try again."""
        await self.redis.delete(REQUEST_KEY.format(request_id=request_id))

    # -- builds asked for, not seen yet ------------------------------------------------------

    async def await_build(self, awaited: AwaitedBuild, *, look_at: float) -> None:
        """Note a build asked for, to be looked for by the poller from `look_at` (unix time)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(AWAITED_KEY, awaited.request_id, awaited.model_dump_json())
            pipe.zadd(AWAITED_DUE_KEY, {awaited.request_id: look_at})
            pipe.expire(AWAITED_KEY, AWAITED_TTL)
            pipe.expire(AWAITED_DUE_KEY, AWAITED_TTL)
            await pipe.execute()

    async def look_for_awaited(self, request_id: str, *, at: float) -> None:
        """Have the poller look for an awaited build from `at` on (if it is still awaited)."""
        await self.redis.zadd(AWAITED_DUE_KEY, {request_id: at}, xx=True)

    async def awaited_due(self, now: float, *, limit: int) -> list[AwaitedBuild]:
        """The awaited builds due to be looked for, soonest first."""
        ids = [
            _text(i)
            for i in await self.redis.zrangebyscore(
                AWAITED_DUE_KEY, "-inf", now, start=0, num=limit
            )
        ]
        if not ids:
            return []
        found = []
        for request_id, raw in zip(ids, await self.redis.hmget(AWAITED_KEY, ids), strict=True):
            if raw is None:  # taken meanwhile, or its hash expired
                await self.redis.zrem(AWAITED_DUE_KEY, request_id)
                continue
            found.append(AwaitedBuild.model_validate_json(raw))
        return found

    async def awaited_count(self, *, due_by: float) -> int:
        """How many awaited builds are due to be looked for by `due_by` (unix time)."""
        return int(await self.redis.zcount(AWAITED_DUE_KEY, "-inf", due_by))

    async def take_awaited(self, request_id: str) -> bool:
        """Stop awaiting a build; True for the one caller that took it (once across replicas)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(AWAITED_KEY, request_id)
            pipe.zrem(AWAITED_DUE_KEY, request_id)
            taken, _ = await pipe.execute()
        return bool(taken)

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
        record = {"p": pipeline, "n": number, "ph": "", "r": 0, "g": 0, "m": {}}
        result = int(
            await self._on_record(
                self._track,
                build_id,
                keys=[
                    BUILD_KEY.format(build_id=build_id),
                    BY_NUMBER_KEY.format(pipeline=pipeline, number=number),
                    EVENTS_STREAM,
                ],
                args=[
                    build_id,
                    _json(record),
                    target.channel,
                    _json(_encode_target(target)),
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
        `blocked` is not kept: the phase of a build on a block step ends in ":blocked".
        """
        result = await self._on_record(
            self._observe,
            build_id,
            keys=[BUILD_KEY.format(build_id=build_id), PENDING_KEY, EVENTS_STREAM],
            args=[
                build_id,
                phase,
                rank,
                _json(_encode_snapshot(build_id, snapshot)),
                "1" if final else "0",
                now if now is not None else time.time(),
                EVENTS_MAXLEN,
                FINAL_TTL,
                PENDING_TTL,
                FINAL_RANK,
                REGRESSED,
                _BY_NUMBER_FORMAT,
            ],
        )
        if result is None:
            return None
        return _text(result)

    async def reset(self, build_id: str, *, new_generation: bool) -> int | None:
        """Let the build's phase move back; a new generation re-arms its thread replies.

        Used when Buildkite confirms a build left a block step, or a finished build runs again.
        Returns the build's generation, or None if it is not tracked.
        """
        gen = await self._on_record(
            self._reset,
            build_id,
            keys=[BUILD_KEY.format(build_id=build_id), PENDING_KEY],
            args=[
                "1" if new_generation else "0",
                time.time(),
                build_id,
                PENDING_TTL,
                _BY_NUMBER_FORMAT,
            ],
        )
        return None if int(gen) < 0 else int(gen)

    async def forget_pending(self, build_id: str) -> None:
        """Stop following a build (its record is gone or Buildkite no longer knows it)."""
        await self.redis.zrem(PENDING_KEY, build_id)

    async def get(self, build_id: str) -> TrackedBuild | None:
        record = await self._record(build_id)
        if record is None:
            return None
        messages = _mapping(record.get("m"))
        return TrackedBuild(
            build_id=build_id,
            pipeline=record["p"],
            number=int(record["n"]),
            phase=record.get("ph", ""),
            gen=int(record.get("g") or 0),
            snapshot=_decode_snapshot(build_id, _mapping(record.get("s"))),
            retried=bool(record.get("rt")),
            targets=[_decode_target(c, _mapping(messages[c])) for c in sorted(messages)],
        )

    async def find(self, pipeline: str, number: int) -> TrackedBuild | None:
        build_id = await self.redis.get(BY_NUMBER_KEY.format(pipeline=pipeline, number=number))
        if build_id is None:
            return None
        return await self.get(_text(build_id))

    async def save_target(self, build_id: str, target: MessageTarget) -> None:
        """Remember a channel message's ts and what it shows (callers hold the build's lock)."""
        await self._amend_record(build_id, "target", target.channel, _json(_encode_target(target)))

    async def mark_retried(self, build_id: str) -> None:
        await self._amend_record(build_id, "retried")

    async def count_auto_retry(self, build_id: str) -> int:
        """Count one more automatic retry of this build; returns the attempt number.

        A build no longer tracked has no attempts left (sys.maxsize).
        """
        attempt = await self._amend_record(build_id, "count")
        return attempt if attempt >= 0 else sys.maxsize

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

    async def forget_idle_consumers(self, keep: str, *, idle_ms: int) -> list[str]:
        """Drop the group's consumers with nothing pending that have not read for `idle_ms`
        (processes long gone: each process reads under a new name). Returns their names.

        Nothing is lost: a consumer with pending entries is kept until they are taken over, and
        a live process that read nothing for so long is re-added by its next read."""
        gone = []
        consumers: Any = await self.redis.xinfo_consumers(EVENTS_STREAM, EVENTS_GROUP)
        for consumer in consumers:
            name = _text(consumer["name"])
            if name == keep or int(consumer["pending"]) or int(consumer["idle"]) < idle_ms:
                continue
            await self.redis.xgroup_delconsumer(EVENTS_STREAM, EVENTS_GROUP, name)
            gone.append(name)
        return gone

    async def ack_transition(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(EVENTS_STREAM, EVENTS_GROUP, entry_id)
            pipe.xdel(EVENTS_STREAM, entry_id)
            await pipe.execute()

    # -- guards and locks -------------------------------------------------------------------

    async def was_posted(self, build_id: str, channel: str, gen: int, kind: str) -> bool:
        record = await self._record(build_id)
        marks = _mapping(record.get("k")) if record else {}
        return POSTED_MARK.format(channel=channel, gen=gen, kind=kind) in marks

    async def mark_posted(self, build_id: str, channel: str, gen: int, kind: str) -> None:
        """Remember a thread reply as posted (kept in the build's record, gone with it)."""
        mark = POSTED_MARK.format(channel=channel, gen=gen, kind=kind)
        await self._amend_record(build_id, "mark", mark)

    async def once(self, build_id: str, gen: int, what: str) -> bool:
        """True the first time it is called for this build, generation and action.

        False for a build that is no longer tracked: nothing is done for it.
        """
        mark = ONCE_MARK.format(gen=gen, what=what)
        return await self._amend_record(build_id, "mark", mark) == 1

    async def begin_post(self, key: str, now: float) -> float | None:
        """Note that a keyed Slack post is about to be made; returns when an earlier attempt was
        made if one was never recorded as done (it may have reached Slack: look before posting).
        """
        redis_key = POST_ATTEMPT_KEY.format(key=key)
        if await self.redis.set(redis_key, repr(now), nx=True, ex=FINAL_TTL):
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

    # -- build records ----------------------------------------------------------------------

    async def _record(self, build_id: str) -> dict[str, Any] | None:
        """A build's record as stored (short names), or None when it is not tracked."""
        key = BUILD_KEY.format(build_id=build_id)
        try:
            raw = await self.redis.get(key)
        except redis.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            await self._upgrade(build_id)
            raw = await self.redis.get(key)
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    async def _amend_record(self, build_id: str, op: str, *args: str) -> int:
        padded = [*args, "", ""][:2]
        keys = [BUILD_KEY.format(build_id=build_id)]
        return int(await self._on_record(self._amend, build_id, keys=keys, args=[op, *padded]))

    async def _on_record(
        self, script: AsyncScript, build_id: str, *, keys: list[str], args: list[Any]
    ) -> Any:
        """Run a script on a build's record, converting a legacy record first if it meets one."""
        result = await script(keys=keys, args=[*args, _LEGACY])
        if isinstance(result, bytes | str) and _text(result) == _LEGACY:
            await self._upgrade(build_id)
            result = await script(keys=keys, args=[*args, _LEGACY])
        return result

    async def _upgrade(self, build_id: str) -> None:
        """Convert a build kept in the legacy layout (a hash, a messages hash and a key per
        marker) into its record, keeping its TTL. Nothing is lost: a build followed across an
        upgrade carries on, its replies still posted once."""
        key = BUILD_KEY.format(build_id=build_id)
        messages_key = LEGACY_MESSAGES_KEY.format(build_id=build_id)
        for _ in range(10):  # only another process changing the legacy hash meanwhile repeats it
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(key)
                pipe.hgetall(messages_key)
                raw, raw_messages = await pipe.execute()
            data = {_text(k): _text(v) for k, v in raw.items()}
            gen = data.get("gen") or "0"
            targets = {
                _text(channel): MessageTarget.model_validate_json(value)
                for channel, value in raw_messages.items()
            }
            marks = {
                POSTED_MARK.format(channel=channel, gen=gen, kind=kind): LEGACY_POSTED_KEY.format(
                    build_id=build_id, channel=channel, gen=gen, kind=kind
                )
                for channel in targets
                for kind in _LEGACY_REPLY_KINDS
            } | {
                ONCE_MARK.format(gen=gen, what=what): LEGACY_ONCE_KEY.format(
                    build_id=build_id, gen=gen, what=what
                )
                for what in _LEGACY_ONCE_ACTIONS
            }
            async with self.redis.pipeline(transaction=False) as pipe:
                for legacy_key in marks.values():
                    pipe.exists(legacy_key)
                present = await pipe.execute()
            record = ""
            if "pipeline" in data:  # else a stray field written after the record expired
                fields: dict[str, Any] = {
                    "p": data["pipeline"],
                    "n": int(data["number"]),
                    "ph": data.get("phase", ""),
                    "r": int(data.get("rank") or 0),
                    "g": int(gen),
                    "s": _encode_snapshot(build_id, json.loads(data.get("snapshot") or "{}")),
                    "m": {c: _encode_target(t) for c, t in targets.items()},
                }
                done = [mark for mark, found in zip(marks, present, strict=True) if found]
                if done:
                    fields["k"] = dict.fromkeys(done, 1)
                if data.get("retried") == "1":
                    fields["rt"] = 1
                if int(data.get("auto_retries") or 0):
                    fields["ar"] = int(data["auto_retries"])
                record = _json(fields)
            replaced = await self._replace_legacy(
                keys=[key, messages_key, *marks.values()],
                args=[
                    record,
                    data.get("phase", ""),
                    data.get("rank") or "0",
                    data.get("gen") or "0",
                    PENDING_TTL,
                ],
            )
            if int(replaced):
                return
        raise RuntimeError(f"could not convert the legacy record of build {build_id}")

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

    async def deploy_request(self, request_id: str) -> dict[str, Any] | None:
        """Read a deploy request without using it up (to check who may act on it)."""
        raw = await self.redis.get(DEPLOY_REQUEST_KEY.format(request_id=request_id))
        return json.loads(raw) if raw else None

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
