"""What agents (MCP clients) leave in Redis: their budgets, their calls' results (so that a
retried call is answered, not done again), brief read caches, and the change announcements
their waits wake on."""

from __future__ import annotations

import contextlib
import math

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app.storage.codec import text
from app.storage.keys import (
    AGENT_BUDGET_KEY,
    AGENT_CALL_KEY,
    AGENT_CALL_RUNNING_TTL,
    AGENT_CALL_TTL,
    AGENT_READ_KEY,
    APPROVAL_KEY,
    CHANGES_CHANNEL,
)
from app.storage.records import ApprovalOutcome, ApprovalStatus

#: How long Redis has to confirm a subscription (seconds).
SUBSCRIBE_TIMEOUT = 5.0


def build_topic(build_id: str) -> str:
    return f"build:{build_id}"


def approval_topic(approval_id: str) -> str:
    return f"approval:{approval_id}"


class AgentLedger:
    """Budgets, call results, read caches and change announcements, over one client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def spend_budget(
        self, agent: str, kind: str, *, limit: int, window: int, now: float
    ) -> tuple[float | None, int]:
        """Take one unit of the agent's `kind` budget for the current window of `window`
        seconds: (None when taken, else the seconds until the next window opens; how many
        calls the window has counted, this one included)."""
        slot = int(now // window)
        key = AGENT_BUDGET_KEY.format(agent=agent, kind=kind, window=slot)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 2 * window)
            used, _ = await pipe.execute()
        if int(used) <= limit:
            return None, int(used)
        return max(1.0, math.ceil((slot + 1) * window - now)), int(used)

    async def begin_call(self, agent: str, key: str) -> str | None:
        """Claim a mutation's identity; None if claimed now, else its result ("" while the first
        call still runs)."""
        redis_key = AGENT_CALL_KEY.format(agent=agent, key=key)
        if await self.redis.set(redis_key, "", nx=True, ex=AGENT_CALL_RUNNING_TTL):
            return None
        found = await self.redis.get(redis_key)
        return text(found) if found is not None else None

    async def call_result(self, agent: str, key: str) -> str | None:
        found = await self.redis.get(AGENT_CALL_KEY.format(agent=agent, key=key))
        return text(found) if found is not None else None

    async def finish_call(self, agent: str, key: str, result: str) -> None:
        """Keep a call's result for its retries."""
        await self.redis.set(AGENT_CALL_KEY.format(agent=agent, key=key), result, ex=AGENT_CALL_TTL)

    async def drop_call(self, agent: str, key: str) -> None:
        """Forget a call that did not complete, so that its retry is tried again."""
        await self.redis.delete(AGENT_CALL_KEY.format(agent=agent, key=key))

    async def cached_read(self, what: str) -> str | None:
        found = await self.redis.get(AGENT_READ_KEY.format(what=what))
        return text(found) if found is not None else None

    async def cache_read(self, what: str, value: str, *, ttl: float) -> None:
        await self.redis.set(AGENT_READ_KEY.format(what=what), value, px=max(1, int(ttl * 1000)))

    async def settle_approval(
        self, approval_id: str, *, number: int | None, problem: str | None
    ) -> None:
        """Note what a decided (or expired) approval led to, and announce it to waiters."""
        key = APPROVAL_KEY.format(approval_id=approval_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hset(
                key,
                mapping={
                    "settled": "1",
                    "problem": problem or "",
                    "build": str(number) if number is not None else "",
                },
            )
            exists, _ = await pipe.execute()
        if not exists:  # expired meanwhile: do not leave a record without its TTL
            await self.redis.delete(key)
            return
        await self.announce(approval_topic(approval_id))

    async def approval_outcome(self, approval_id: str) -> ApprovalOutcome | None:
        raw = await self.redis.hgetall(APPROVAL_KEY.format(approval_id=approval_id))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        build = fields.get("build", "")
        return ApprovalOutcome(
            status=ApprovalStatus(fields["status"]),
            expires_at=float(fields.get("expires_at") or 0),
            settled=fields.get("settled") == "1",
            build=int(build) if build.isascii() and build.isdigit() else None,
            problem=fields.get("problem") or None,
            request=fields.get("request", ""),
        )

    async def announce(self, topic: str) -> None:
        """Wake whoever waits on `topic` in any replica (best effort: waits re-read anyway)."""
        await self.redis.publish(CHANGES_CHANNEL, topic)

    async def subscribe_changes(self) -> PubSub:
        """A pub/sub connection subscribed to the change announcements (Redis confirmed it:
        every announcement from now on is heard); each message's data is the topic announced
        (`build_topic`, `approval_topic`). The caller closes it."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CHANGES_CHANNEL)
            confirmed = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
            if confirmed is None or confirmed.get("type") != "subscribe":
                raise RedisError("the subscription to the change announcements was not confirmed")
            pubsub.ignore_subscribe_messages = True  # from now on, only the announcements
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise
        return pubsub
