"""Deploy locks on pipelines: a person freezes a pipeline, with a reason and an optional expiry."""

from __future__ import annotations

import redis.asyncio as redis

from app.storage.keys import PIPELINE_LOCK_KEY
from app.storage.records import PipelineLock


class PipelineLocks:
    """One lock per pipeline (SET NX), expiring by itself when given a TTL."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def lock_pipeline(
        self, pipeline: str, *, user: str, reason: str, ttl: int | None, now: float
    ) -> PipelineLock | None:
        """Take the deploy lock; None if taken now, else the current holder's lock."""
        key = PIPELINE_LOCK_KEY.format(pipeline=pipeline)
        lock = PipelineLock(
            pipeline=pipeline,
            user=user,
            reason=reason,
            since=now,
            expires_at=now + ttl if ttl else None,
        )
        if await self.redis.set(key, lock.model_dump_json(), nx=True, ex=ttl):
            return None
        current = await self.pipeline_lock(pipeline)
        return current or await self.lock_pipeline(
            pipeline, user=user, reason=reason, ttl=ttl, now=now
        )

    async def pipeline_lock(self, pipeline: str) -> PipelineLock | None:
        raw = await self.redis.get(PIPELINE_LOCK_KEY.format(pipeline=pipeline))
        return PipelineLock.model_validate_json(raw) if raw else None

    async def unlock_pipeline(self, pipeline: str) -> bool:
        return bool(await self.redis.delete(PIPELINE_LOCK_KEY.format(pipeline=pipeline)))

    async def pipeline_locks(self) -> list[PipelineLock]:
        locks = []
        async for key in self.redis.scan_iter(match=PIPELINE_LOCK_KEY.format(pipeline="*")):
            raw = await self.redis.get(key)
            if raw:
                locks.append(PipelineLock.model_validate_json(raw))
        return sorted(locks, key=lambda lock: lock.pipeline)
