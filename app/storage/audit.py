"""The audit trail: a bounded stream of who did what, read newest first."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis

from app.storage.codec import text
from app.storage.keys import AUDIT_MAXLEN, AUDIT_STREAM
from app.storage.records import AuditEntry


class AuditTrail:
    """Append to the audit stream (bounded) and read it back newest first."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def audit(self, entry: AuditEntry) -> None:
        fields: dict[Any, Any] = entry.model_dump()
        await self.redis.xadd(AUDIT_STREAM, fields, maxlen=AUDIT_MAXLEN, approximate=True)

    async def audit_entries(self, *, pipeline: str | None, limit: int) -> list[AuditEntry]:
        """The latest audit entries, newest first, optionally for one pipeline."""
        found: list[AuditEntry] = []
        last = "+"
        while len(found) < limit:
            batch: Any = await self.redis.xrevrange(AUDIT_STREAM, max=last, count=200)
            if not batch:
                break
            for _entry_id, fields in batch:
                entry = AuditEntry(**{text(k): text(v) for k, v in fields.items()})
                if pipeline is None or entry.pipeline == pipeline:
                    found.append(entry)
                    if len(found) >= limit:
                        break
            last = "(" + text(batch[-1][0])
        return found
