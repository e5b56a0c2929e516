"""What the bot keeps for the surfaces that are a person's own (thread commands, unfurls): the
Events API deliveries already handled."""

from __future__ import annotations

import redis.asyncio as redis

from app.storage.keys import EVENT_KEY, EVENT_TTL


class InboxRecords:
    """SET NX guards for Events API deliveries."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def first_event(self, event_id: str) -> bool:
        """Remember an Events API delivery; False if this event was handled before (a retry)."""
        key = EVENT_KEY.format(event_id=event_id)
        return bool(await self.redis.set(key, "1", nx=True, ex=EVENT_TTL))
