"""Deploy locks on pipelines: a person freezes a pipeline, with a reason and an optional expiry."""

from __future__ import annotations

import redis.asyncio as redis

from app.storage.codec import text
from app.storage.keys import LOCK_EXPIRY_KEY, LOCKS_HELD_KEY, PIPELINE_LOCK_KEY
from app.storage.records import PipelineLock


class PipelineLocks:
    """One lock per pipeline (SET NX), expiring by itself when given a TTL."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def lock_pipeline(
        self,
        pipeline: str,
        *,
        user: str,
        reason: str,
        ttl: int | None,
        now: float,
        channel: str | None = None,
    ) -> PipelineLock | None:
        """Take the deploy lock; None if taken now, else the current holder's lock."""
        key = PIPELINE_LOCK_KEY.format(pipeline=pipeline)
        lock = PipelineLock(
            pipeline=pipeline,
            user=user,
            reason=reason,
            since=now,
            expires_at=now + ttl if ttl else None,
            channel=channel,
        )
        raw = lock.model_dump_json()
        if await self.redis.set(key, raw, nx=True, ex=ttl):
            await self.redis.zadd(LOCKS_HELD_KEY, {pipeline: now})
            if lock.expires_at is not None:  # its channel is told when it expires
                await self.redis.zadd(LOCK_EXPIRY_KEY, {raw: lock.expires_at})
            return None
        current = await self.pipeline_lock(pipeline)
        return current or await self.lock_pipeline(
            pipeline, user=user, reason=reason, ttl=ttl, now=now, channel=channel
        )

    async def pipeline_lock(self, pipeline: str) -> PipelineLock | None:
        raw = await self.redis.get(PIPELINE_LOCK_KEY.format(pipeline=pipeline))
        return PipelineLock.model_validate_json(raw) if raw else None

    async def unlock_pipeline(self, pipeline: str) -> bool:
        key = PIPELINE_LOCK_KEY.format(pipeline=pipeline)
        raw = await self.redis.get(key)
        deleted = bool(await self.redis.delete(key))
        await self.redis.zrem(LOCKS_HELD_KEY, pipeline)
        if raw:  # lifted before its time: no expiry to tell of
            await self.redis.zrem(LOCK_EXPIRY_KEY, raw)
        return deleted

    async def held_locks(self) -> list[PipelineLock]:
        """The locks held now, from the index of locked pipelines (no scan of the keyspace)."""
        locks = []
        for pipeline in [text(p) for p in await self.redis.zrange(LOCKS_HELD_KEY, 0, -1)]:
            lock = await self.pipeline_lock(pipeline)
            if lock is None:  # expired by Redis meanwhile
                await self.redis.zrem(LOCKS_HELD_KEY, pipeline)
            else:
                locks.append(lock)
        return locks

    async def pipeline_locks(self) -> list[PipelineLock]:
        locks = []
        async for key in self.redis.scan_iter(match=PIPELINE_LOCK_KEY.format(pipeline="*")):
            raw = await self.redis.get(key)
            if raw:
                locks.append(PipelineLock.model_validate_json(raw))
        return sorted(locks, key=lambda lock: lock.pipeline)
