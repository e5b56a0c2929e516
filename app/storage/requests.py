"""Claims that make a request happen once: mutations, button clicks, webhook deliveries and
keyed Slack posts, and the builds asked for whose answer the bot has not seen yet."""

from __future__ import annotations

import redis.asyncio as redis

from app.storage.codec import text
from app.storage.keys import (
    AWAITED_DUE_KEY,
    AWAITED_KEY,
    AWAITED_TTL,
    CLICK_KEY,
    CLICK_TTL,
    POST_ATTEMPT_KEY,
    POST_ATTEMPT_TTL,
    REQUEST_KEY,
    REQUEST_TTL,
    WEBHOOK_KEY,
    WEBHOOK_TTL,
)
from app.storage.records import AwaitedBuild
from buildkite.webhooks import Signature


class RequestClaims:
    """SET NX guards, each with a TTL, so that a duplicate or a replay does nothing."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def claim_request(
        self, request_id: str, owner: str, ttl: int = REQUEST_TTL
    ) -> str | None:
        """Claim a mutation request; None if claimed now, else who claimed it first."""
        key = REQUEST_KEY.format(request_id=request_id)
        if await self.redis.set(key, owner, nx=True, ex=ttl):
            return None
        previous = await self.redis.get(key)
        return text(previous or "")

    async def release_request(self, request_id: str) -> None:
        """Forget a claim whose mutation never reached Buildkite, so the user may try again."""
        await self.redis.delete(REQUEST_KEY.format(request_id=request_id))

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

    async def begin_post(self, key: str, now: float) -> float | None:
        """Note that a keyed Slack post is about to be made; returns when an earlier attempt was
        made if one was never recorded as done (it may have reached Slack: look before posting).
        """
        redis_key = POST_ATTEMPT_KEY.format(key=key)
        if await self.redis.set(redis_key, repr(now), nx=True, ex=POST_ATTEMPT_TTL):
            return None
        earlier = await self.redis.get(redis_key)
        return float(text(earlier)) if earlier is not None else None

    async def end_post(self, key: str) -> None:
        """The keyed post is made and recorded: forget the attempt."""
        await self.redis.delete(POST_ATTEMPT_KEY.format(key=key))


class AwaitedBuilds:
    """Creates and rebuilds sent to Buildkite whose build has not been seen yet."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

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
            text(i)
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
