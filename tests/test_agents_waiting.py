"""The waits' wake-ups: one subscription per process, woken by the store's announcement (the
re-read every `recheck` is only a safety net), on Redis and on the embedded store alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import fakeredis
import pytest
import redis.asyncio as redis

from app.agents.waiting import Changes
from app.storage.agents import build_topic
from app.storage.codec import text
from app.storage.records import MessageTarget
from app.storage.store import Store


async def until(predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait (by looking) until `predicate()` holds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("it never happened")


@pytest.fixture(params=["redis", "embedded"])
async def store(request: pytest.FixtureRequest, redis_client: redis.Redis) -> AsyncIterator[Store]:
    """A store on the suite's Redis, then on the embedded one (fakeredis, as without REDIS_URL)."""
    if request.param == "redis":
        yield Store(redis_client)
        return
    client: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        yield Store(client)
    finally:
        await client.aclose()


async def test_an_announcement_wakes_a_wait_long_before_its_recheck(store: Store) -> None:
    # A recheck far longer than the wait's timeout: only the announcement can end it in time.
    changes = Changes(store, recheck=3600)
    value = {"state": "running"}

    async def read() -> str:
        return value["state"]

    try:
        waiting = asyncio.create_task(
            changes.wait_until("build:b1", read, lambda s: s == "passed", timeout=20)
        )
        await until(lambda: changes.waiting)
        # Announce until the subscription (made by the first wait) hears one.
        value["state"] = "passed"
        for _ in range(400):
            if waiting.done():
                break
            await store.announce("build:b1")
            await asyncio.sleep(0.05)
        state, reached = await waiting
        assert (state, reached) == ("passed", True)
        # Another build's announcement wakes nobody else; a timeout says "not reached".
        value["state"] = "running"
        state, reached = await changes.wait_until(
            "build:b2", read, lambda s: s == "passed", timeout=0
        )
        assert (state, reached) == ("running", False)
    finally:
        await changes.close()


async def test_the_store_subscribes_to_its_announcements_for_the_waits(
    redis_client: redis.Redis,
) -> None:
    store = Store(redis_client)
    pubsub = await store.subscribe_changes()
    heard: list[str] = []
    try:
        for _ in range(400):  # announce until the subscription hears one
            await store.announce(build_topic("b1"))
            message = await pubsub.get_message(timeout=0.05)
            if message is not None:
                heard.append(text(message["data"]))
                break
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert heard == [build_topic("b1")]


async def test_a_recorded_change_is_announced_by_the_same_step(store: Store) -> None:
    pubsub = await store.subscribe_changes()
    target = MessageTarget(channel="C0CHAN", requester=None)
    try:
        await store.track(
            "b1",
            pipeline="web",
            number=1,
            target=target,
            phase="scheduled",
            rank=1,
            snapshot={"state": "scheduled"},
            final=False,
        )
        heard = [text(m["data"]) for m in await _drain(pubsub)]
        assert heard == [build_topic("b1")]  # followed: its first phase is a change
        for phase, rank in (("running", 2), ("running", 2), ("passed", 9)):
            await store.observe(
                "b1",
                phase=phase,
                rank=rank,
                snapshot={"state": phase},
                final=phase == "passed",
                blocked=False,
            )
        heard = [text(m["data"]) for m in await _drain(pubsub)]
        assert heard == [build_topic("b1")] * 2  # the same phase twice is no change
        record = await store.get("b1")
        assert record is not None and record.phase == "passed"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _drain(pubsub: Any) -> list[Any]:
    """The messages a subscription holds, once none came for a while."""
    messages = []
    while (message := await pubsub.get_message(timeout=0.5)) is not None:
        messages.append(message)
    return messages


async def test_closing_ends_every_wait_at_once(redis_client: redis.Redis) -> None:
    changes = Changes(Store(redis_client), recheck=3600)

    async def read() -> int:
        return 0

    waits = [
        asyncio.create_task(changes.wait_until(f"build:{i}", read, bool, timeout=3600))
        for i in range(3)
    ]
    await until(lambda: changes.waiting == 3)
    await changes.close()
    results = await asyncio.wait_for(asyncio.gather(*waits), 10)
    assert results == [(0, False)] * 3
    assert changes.waiting == 0


async def test_what_agents_leave_in_redis_expires(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    assert await store.begin_call("captain", "k1") is None
    assert await store.begin_call("captain", "k1") == ""  # running
    running = await redis_client.ttl("{bkchatops}:agentcall:captain:k1")
    assert 0 < running <= 300  # a call cut off frees its key by itself
    await store.finish_call("captain", "k1", '{"status": "started"}')
    assert await store.begin_call("captain", "k1") == '{"status": "started"}'
    assert await redis_client.ttl("{bkchatops}:agentcall:captain:k1") > 23 * 3600
    assert await store.spend_budget("captain", "reads", limit=1, window=60, now=120.0) == (None, 1)
    wait, used = await store.spend_budget("captain", "reads", limit=1, window=60, now=150.0)
    assert (wait, used) == (30, 2)
    assert 0 < await redis_client.ttl("{bkchatops}:agentbudget:captain:reads:2") <= 120
    await store.cache_read("build:web:1", "{}", ttl=2.0)
    assert 0 < await redis_client.pttl("{bkchatops}:agentread:build:web:1") <= 2000


async def test_the_subscription_survives_an_unexpected_error_and_subscribes_again(
    redis_client: redis.Redis,
) -> None:
    """A cold Redis Cluster client raises KeyError on its first pub/sub (no slots known): the
    listener tries again rather than ending, and the waits are woken by announcements after."""
    store = Store(redis_client)
    tries = []

    class ColdFirst:
        async def subscribe_changes(self) -> Any:
            tries.append(1)
            if len(tries) == 1:
                raise KeyError("no slots yet")
            return await store.subscribe_changes()

    changes = Changes(cast(Store, ColdFirst()), recheck=0.01)
    try:
        changes.start()
        await until(lambda: len(tries) >= 2 and changes._subscribed.is_set(), timeout=30)
        value = {"state": "running"}

        async def read() -> str:
            return value["state"]

        waiting = asyncio.create_task(
            changes.wait_until("build:b1", read, lambda s: s == "passed", timeout=20)
        )
        await until(lambda: changes.waiting)
        value["state"] = "passed"
        await store.announce("build:b1")
        assert await waiting == ("passed", True)
    finally:
        await changes.close()
