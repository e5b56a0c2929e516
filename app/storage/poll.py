"""The poller's lease (one process polls per cycle) and the state one cycle leaves the next."""

from __future__ import annotations

import redis.asyncio as redis

from app.storage.codec import text
from app.storage.keys import POLL_LEASE_KEY, POLL_STATE_KEY, POLL_STATE_TTL
from app.storage.records import PollState


class PollLedger:
    """The lease and state that let replicas take turns polling Buildkite."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def acquire_poll_lease(self, owner: str, ttl_ms: int) -> bool:
        return bool(await self.redis.set(POLL_LEASE_KEY, owner, nx=True, px=ttl_ms))

    async def poll_state(self) -> PollState:
        raw = {text(k): text(v) for k, v in (await self.redis.hgetall(POLL_STATE_KEY)).items()}

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
            pipe.expire(POLL_STATE_KEY, POLL_STATE_TTL)
            await pipe.execute()

    async def end_poll_backoff(self) -> None:
        await self.redis.hdel(POLL_STATE_KEY, "resume_at", "failures", "backoff")
