"""Tracked builds in Redis: their records, the one compare-and-set of a phase, the pending set,
the markers of what was posted, and the lock of the process writing a build's messages."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis.asyncio as redis

from app.storage import lua
from app.storage.agents import build_topic
from app.storage.codec import (
    BY_NUMBER_FORMAT,
    compact_json,
    decode_record,
    encode_snapshot,
    encode_target,
    new_record,
    record_marks,
    text,
)
from app.storage.keys import (
    BUILD_KEY,
    BUILD_LOCK_KEY,
    BY_NUMBER_KEY,
    CHANGES_CHANNEL,
    EVENTS_MAXLEN,
    EVENTS_STREAM,
    FINAL_RANK,
    FINAL_TTL,
    ONCE_MARK,
    OUTCOME_KEY,
    OUTCOME_TTL,
    PENDING_KEY,
    PENDING_TTL,
    POSTED_MARK,
    RETRY_BUDGET_KEY,
    RETRY_BUDGET_TTL,
)
from app.storage.records import (
    REGRESSED,
    UNCHANGED,
    MessageTarget,
    Observation,
    TrackedBuild,
)


class BuildRecords:
    """What the bot remembers about each build it follows, shared by every process."""

    def __init__(self, client: redis.Redis, *, lock_ttl_ms: int) -> None:
        self.redis = client
        #: A build's write lock lives this long unless renewed (Tuning.tracking.lock_ttl_ms).
        self.lock_ttl_ms = lock_ttl_ms
        self._observe = client.register_script(lua.record_script("observe"))
        self._track = client.register_script(lua.record_script("track"))
        self._reset = client.register_script(lua.record_script("reset"))
        self._amend = client.register_script(lua.record_script("amend"))
        self._renew_lock = client.register_script(lua.source("renew_lock"))
        self._release_lock = client.register_script(lua.source("release_lock"))

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
        result = int(
            await self._track(
                keys=[
                    BUILD_KEY.format(build_id=build_id),
                    BY_NUMBER_KEY.format(pipeline=pipeline, number=number),
                    EVENTS_STREAM,
                ],
                args=[
                    build_id,
                    new_record(pipeline, number),
                    target.channel,
                    compact_json(encode_target(target)),
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
    ) -> Observation:
        """Record a build's phase: CHANGED (with the previous phase) when this call changed it,
        and announced on the changes channel in the same script, so that waits (app.agents) wake
        before any Slack work; REGRESSED when the phase given is earlier than the one recorded
        (nothing changed).

        `blocked` is not kept: the phase of a build on a block step ends in ":blocked".
        """
        result: Any = await self._observe(
            keys=[BUILD_KEY.format(build_id=build_id), PENDING_KEY, EVENTS_STREAM],
            args=[
                build_id,
                phase,
                rank,
                compact_json(encode_snapshot(build_id, snapshot)),
                "1" if final else "0",
                now if now is not None else time.time(),
                EVENTS_MAXLEN,
                FINAL_TTL,
                PENDING_TTL,
                FINAL_RANK,
                BY_NUMBER_FORMAT,
                # A change is announced by the script itself: waits wake on the same step.
                build_topic(build_id),
                CHANGES_CHANNEL,
            ],
        )
        if not result:
            return UNCHANGED
        if text(result[0]) == "regressed":
            return REGRESSED
        return Observation.changed(text(result[1]))

    async def reset(self, build_id: str, *, new_generation: bool) -> int | None:
        """Let the build's phase move back; a new generation re-arms its thread replies.

        Used when Buildkite confirms a build left a block step, or a finished build runs again.
        Returns the build's generation, or None if it is not tracked.
        """
        gen = int(
            await self._reset(
                keys=[BUILD_KEY.format(build_id=build_id), PENDING_KEY],
                args=[
                    "1" if new_generation else "0",
                    time.time(),
                    build_id,
                    PENDING_TTL,
                    BY_NUMBER_FORMAT,
                ],
            )
        )
        return None if gen < 0 else gen

    async def forget_pending(self, build_id: str) -> None:
        """Stop following a build (its record is gone or Buildkite no longer knows it)."""
        await self.redis.zrem(PENDING_KEY, build_id)

    async def get(self, build_id: str) -> TrackedBuild | None:
        raw = await self.redis.get(BUILD_KEY.format(build_id=build_id))
        return decode_record(build_id, raw) if raw else None

    async def find(self, pipeline: str, number: int) -> TrackedBuild | None:
        build_id = await self.redis.get(BY_NUMBER_KEY.format(pipeline=pipeline, number=number))
        if build_id is None:
            return None
        return await self.get(text(build_id))

    async def save_target(self, build_id: str, target: MessageTarget) -> None:
        """Remember a channel message's ts and what it shows (callers hold the build's lock)."""
        await self._amend_record(
            build_id, "target", target.channel, compact_json(encode_target(target))
        )

    async def mark_retried(self, build_id: str) -> None:
        await self._amend_record(build_id, "retried")

    async def count_auto_retry(self, build_id: str) -> int:
        """Count one more automatic retry of this build; returns the attempt number.

        A build no longer tracked has no attempts left (sys.maxsize).
        """
        attempt = await self._amend_record(build_id, "count")
        return attempt if attempt >= 0 else sys.maxsize

    async def pending(
        self, *, seen_before: float | None = None, limit: int | None = None
    ) -> list[str]:
        """Ids of builds still followed; with `seen_before`, only those not observed since."""
        high: float | str = seen_before if seen_before is not None else "+inf"
        if limit is None:
            ids = await self.redis.zrangebyscore(PENDING_KEY, "-inf", high)
        else:
            ids = await self.redis.zrangebyscore(PENDING_KEY, "-inf", high, start=0, num=limit)
        return [text(i) for i in ids]

    async def pending_count(self) -> int:
        return int(await self.redis.zcard(PENDING_KEY))

    # -- what was done for a build, once -----------------------------------------------------

    async def was_posted(self, build_id: str, channel: str, gen: int, kind: str) -> bool:
        marks = record_marks(await self.redis.get(BUILD_KEY.format(build_id=build_id)))
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

    async def swap_outcome(self, pipeline: str, branch: str, state: str) -> str | None:
        """Record the branch's latest final state; returns the one before it."""
        key = OUTCOME_KEY.format(pipeline=pipeline, branch=branch)
        previous = await self.redis.set(key, state, get=True, ex=OUTCOME_TTL)
        return text(previous) if previous is not None else None

    async def spend_retry_budget(self, pipeline: str, budget: int, now: float) -> int | None:
        """Take one automatic retry from the pipeline's hourly budget; None when it is spent."""
        key = RETRY_BUDGET_KEY.format(pipeline=pipeline, hour=int(now // 3600))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, RETRY_BUDGET_TTL)
            used, _ = await pipe.execute()
        return int(used) if int(used) <= budget else None

    # -- the lock of the process writing a build's messages ------------------------------------

    async def acquire_lock(self, build_id: str) -> str | None:
        """Take the build's write lock; its token, or None while another process holds it."""
        token = uuid.uuid4().hex
        key = BUILD_LOCK_KEY.format(build_id=build_id)
        if await self.redis.set(key, token, nx=True, px=self.lock_ttl_ms):
            return token
        return None

    async def renew_lock(self, build_id: str, token: str) -> bool:
        key = BUILD_LOCK_KEY.format(build_id=build_id)
        return bool(await self._renew_lock(keys=[key], args=[token, self.lock_ttl_ms]))

    async def release_lock(self, build_id: str, token: str) -> None:
        await self._release_lock(keys=[BUILD_LOCK_KEY.format(build_id=build_id)], args=[token])

    async def _amend_record(self, build_id: str, op: str, *args: str) -> int:
        padded = [*args, "", ""][:2]
        keys = [BUILD_KEY.format(build_id=build_id)]
        return int(await self._amend(keys=keys, args=[op, *padded]))
