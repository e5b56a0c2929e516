"""Deploys waiting for their requester's confirmation or for a second person's approval."""

from __future__ import annotations

import json

import redis.asyncio as redis

from app.storage import lua
from app.storage.codec import text
from app.storage.keys import (
    APPROVAL_EXPIRY_KEY,
    APPROVAL_KEEP,
    APPROVAL_KEY,
    DEPLOY_REQUEST_KEY,
    DEPLOY_REQUEST_TTL,
)
from app.storage.records import Approval, ApprovalDecision, ApprovalStatus, PendingDeploy


class Approvals:
    """Confirmations (read once) and approvals (decided once, or expired)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._decide = client.register_script(lua.source("decide_approval"))

    async def save_deploy_request(self, request_id: str, request: PendingDeploy) -> None:
        key = DEPLOY_REQUEST_KEY.format(request_id=request_id)
        await self.redis.set(key, _encode(request), ex=DEPLOY_REQUEST_TTL)

    async def deploy_request(self, request_id: str) -> PendingDeploy | None:
        """Read a deploy request without using it up (to check who may act on it)."""
        raw = await self.redis.get(DEPLOY_REQUEST_KEY.format(request_id=request_id))
        return _decode(raw) if raw else None

    async def take_deploy_request(self, request_id: str) -> PendingDeploy | None:
        """Read and forget a deploy request, so that it is acted on once."""
        raw = await self.redis.getdel(DEPLOY_REQUEST_KEY.format(request_id=request_id))
        return _decode(raw) if raw else None

    async def create_approval(
        self, approval_id: str, request: PendingDeploy, *, expires_at: float
    ) -> None:
        key = APPROVAL_KEY.format(approval_id=approval_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "request": _encode(request),
                    "status": ApprovalStatus.PENDING.value,
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

    async def approval(self, approval_id: str) -> Approval | None:
        raw = await self.redis.hgetall(APPROVAL_KEY.format(approval_id=approval_id))
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        return Approval(
            request=_decode(fields["request"]),
            status=ApprovalStatus(fields["status"]),
            expires_at=float(fields["expires_at"]),
            channel=fields.get("channel", ""),
            ts=fields.get("ts", ""),
            decided_by=fields.get("decided_by", ""),
        )

    async def decide_approval(
        self, approval_id: str, *, status: ApprovalStatus, user: str, now: float
    ) -> ApprovalDecision:
        """DECIDED when this call decided it (as `status`), EXPIRED_NOW when this very call found
        it expired (so its message needs updating), else what it was already, or MISSING."""
        result = await self._decide(
            keys=[APPROVAL_KEY.format(approval_id=approval_id), APPROVAL_EXPIRY_KEY],
            args=[status.value, user, now, approval_id],
        )
        return ApprovalDecision(text(result))

    async def due_approvals(self, now: float) -> list[str]:
        return [text(i) for i in await self.redis.zrangebyscore(APPROVAL_EXPIRY_KEY, "-inf", now)]


def _encode(request: PendingDeploy) -> str:
    """A deploy request as kept: its plan's fields, and the requester's and channel's names."""
    names = {"user_name": request.user_name, "channel_name": request.channel_name}
    return json.dumps({**request.plan, **names})


def _decode(raw: bytes | str) -> PendingDeploy:
    plan = json.loads(raw)
    return PendingDeploy(
        user_name=plan.pop("user_name", None),
        channel_name=plan.pop("channel_name", None),
        plan=plan,
    )
