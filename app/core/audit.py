"""The audit trail: every mutation attempt, allowed or refused, as a log line and in Redis."""

from __future__ import annotations

import logging
import time

from redis.exceptions import RedisError

from app.storage.records import AuditEntry
from app.storage.store import Store

log = logging.getLogger("app.core.audit")


class Auditor:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(
        self,
        *,
        user: str,
        action: str,
        pipeline: str,
        channel: str,
        outcome: str,
        number: int | None = None,
        url: str | None = None,
        detail: str = "",
    ) -> None:
        entry = {
            "time": f"{time.time():.3f}",
            "user": user,
            "action": action,
            "pipeline": pipeline,
            "build": str(number) if number is not None else "",
            "channel": channel,
            "outcome": outcome,
            "url": url or "",
            "detail": detail[:500],
        }
        log.info(
            "audit: %s %s%s by %s in %s: %s%s",
            action,
            pipeline,
            f" #{number}" if number is not None else "",
            user,
            channel,
            outcome,
            f" ({detail})" if detail else "",
            extra={"audit": entry},
        )
        try:
            await self.store.audit(AuditEntry(**entry))
        except RedisError as exc:  # the log line above still records it
            log.warning("audit entry not stored in redis: %s", exc)
