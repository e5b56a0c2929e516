"""The stream of build transitions and its consumer group: every transition is read by one
process, and one left unfinished by a dead process is reclaimed by another."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as redis

from app.storage.codec import text
from app.storage.keys import EVENTS_GROUP, EVENTS_STREAM
from app.storage.records import Transition


class TransitionStream:
    """Read, reclaim and acknowledge the transitions `BuildRecords.observe` emits."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(EVENTS_STREAM, EVENTS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_transitions(
        self, consumer: str, *, count: int = 20, block_ms: int = 1000
    ) -> list[Transition]:
        reply: Any = await self.redis.xreadgroup(
            EVENTS_GROUP, consumer, {EVENTS_STREAM: ">"}, count=count, block=block_ms
        )
        return [t for _, entries in reply or [] for t in _transitions(entries)]

    async def reclaim_transitions(
        self, consumer: str, *, min_idle_ms: int, count: int = 50
    ) -> list[Transition]:
        """Take over transitions that another (probably dead) process read but never finished."""
        reply: Any = await self.redis.xautoclaim(
            EVENTS_STREAM, EVENTS_GROUP, consumer, min_idle_time=min_idle_ms, count=count
        )
        return _transitions(reply[1])

    async def delivery_count(self, entry_id: str) -> int:
        """How many times a transition was handed to a reader (it grows with each reclaim)."""
        info: Any = await self.redis.xpending_range(
            EVENTS_STREAM, EVENTS_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 0

    async def forget_idle_consumers(self, keep: str, *, idle_ms: int) -> list[str]:
        """Drop the group's consumers with nothing pending that have not read for `idle_ms`
        (processes long gone: each process reads under a new name). Returns their names.

        Nothing is lost: a consumer with pending entries is kept until they are taken over, and
        a live process that read nothing for so long is re-added by its next read."""
        gone = []
        consumers: Any = await self.redis.xinfo_consumers(EVENTS_STREAM, EVENTS_GROUP)
        for consumer in consumers:
            name = text(consumer["name"])
            if name == keep or int(consumer["pending"]) or int(consumer["idle"]) < idle_ms:
                continue
            await self.redis.xgroup_delconsumer(EVENTS_STREAM, EVENTS_GROUP, name)
            gone.append(name)
        return gone

    async def ack_transition(self, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(EVENTS_STREAM, EVENTS_GROUP, entry_id)
            pipe.xdel(EVENTS_STREAM, entry_id)
            await pipe.execute()


def _transitions(entries: Sequence[Any]) -> list[Transition]:
    out = []
    for entry_id, fields in entries:
        if not fields:  # deleted while pending
            continue
        f = {text(k): text(v) for k, v in cast(dict[bytes, bytes], fields).items()}
        out.append(
            Transition(
                entry_id=text(entry_id),
                build_id=f["build_id"],
                old=f.get("from", ""),
                new=f["to"],
                gen=int(f.get("gen") or 0),
                channel=f.get("channel") or None,
            )
        )
    return out
