"""The one object callers hold for everything the bot keeps in Redis.

Tracking state is shared by every bot process on the same Redis, so every decision that must be
taken once (a state transition, a thread reply, a mutation) is taken in Redis atomically. Each
concern is its own small class (keys in `keys`, scripts in `scripts/`, records in `records`);
`Store` is all of them over one client, so callers keep one dependency.
"""

from __future__ import annotations

import redis.asyncio as redis

from app.storage.agents import AgentLedger
from app.storage.approvals import Approvals
from app.storage.audit import AuditTrail
from app.storage.builds import BuildRecords
from app.storage.guards import Guards
from app.storage.inbox import InboxRecords
from app.storage.ledger import ReleaseLedger
from app.storage.locks import PipelineLocks
from app.storage.poll import PollLedger
from app.storage.requests import AwaitedBuilds, RequestClaims
from app.storage.transitions import TransitionStream
from app.tuning import DEFAULT, Tuning


class Store(
    BuildRecords,
    TransitionStream,
    RequestClaims,
    AwaitedBuilds,
    Approvals,
    PipelineLocks,
    AuditTrail,
    PollLedger,
    ReleaseLedger,
    Guards,
    AgentLedger,
    InboxRecords,
):
    """Every concern of the store over one `redis.asyncio` client."""

    def __init__(self, client: redis.Redis, tuning: Tuning = DEFAULT) -> None:
        # Each part keeps the client and registers its own scripts (their names do not clash).
        BuildRecords.__init__(self, client, lock_ttl_ms=tuning.tracking.lock_ttl_ms)
        TransitionStream.__init__(self, client)
        RequestClaims.__init__(self, client)
        AwaitedBuilds.__init__(self, client)
        Approvals.__init__(self, client)
        PipelineLocks.__init__(self, client)
        AuditTrail.__init__(self, client)
        PollLedger.__init__(self, client)
        ReleaseLedger.__init__(self, client)
        Guards.__init__(self, client)
        AgentLedger.__init__(self, client)
        InboxRecords.__init__(self, client)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())
