"""The ledger's one write, against a real Redis: the same build reported twice (by a webhook
and a poll, or by two replicas at once) is written once; a running report never replaces a
final one; a later final (a retried build) replaces an earlier one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as redis

from app.storage import keys
from app.storage.ledger import Deployment, Outcome, Source
from app.storage.store import Store


def deployment(outcome: Outcome, finished: int | None, **extra: Any) -> Deployment:
    now = int(time.time())
    return Deployment(
        pipeline="web",
        number=7,
        web_url="https://buildkite.example.com/acme/web/builds/7",
        commit="a" * 40,
        branch="main",
        outcome=outcome,
        requested_by="U0USER",
        started_at=now - 100,
        finished_at=finished,
        **extra,
    )


async def test_two_replicas_recording_the_same_final_write_it_once(
    redis_url: str, redis_client: Any
) -> None:
    other = redis.Redis.from_url(redis_url)
    try:
        final = deployment(Outcome.PASSED, int(time.time()))
        results = await asyncio.gather(
            Store(redis_client).record_deployment(final), Store(other).record_deployment(final)
        )
        assert sorted(results) == [False, True]
    finally:
        await other.aclose()
    store = Store(redis_client)
    assert await store.deployment("web", 7) == final  # an unusual web URL is kept whole
    assert await store.deployments("web") == [final]
    assert await store.ledger_pipelines() == ["web"]


async def test_running_never_replaces_final_and_a_later_final_does(redis_client: Any) -> None:
    store = Store(redis_client)
    now = int(time.time())
    assert await store.record_deployment(deployment(Outcome.RUNNING, None))
    failed = deployment(Outcome.FAILED, now - 10)
    assert await store.record_deployment(failed)
    assert not await store.record_deployment(deployment(Outcome.RUNNING, None))
    assert not await store.record_deployment(deployment(Outcome.PASSED, now - 20))  # older
    retried = deployment(Outcome.PASSED, now, source=Source.ROUTE)
    assert await store.record_deployment(retried)
    assert await store.deployment("web", 7) == retried


async def test_an_entry_past_its_keep_is_not_written_and_an_expired_one_is_forgotten(
    redis_client: Any,
) -> None:
    store = Store(redis_client)
    old = deployment(Outcome.PASSED, 1).model_copy(update={"started_at": 0})
    assert not await store.record_deployment(old)
    assert await store.record_deployment(deployment(Outcome.PASSED, int(time.time())))
    await redis_client.delete(keys.DEPLOYMENT_KEY.format(pipeline="web", number=7))  # expired
    assert await store.deployments("web") == []
    assert await redis_client.zcard(keys.LEDGER_KEY.format(pipeline="web")) == 0


async def test_an_unreadable_entry_is_no_deployment(redis_client: Any) -> None:
    store = Store(redis_client)
    await store.record_deployment(deployment(Outcome.PASSED, int(time.time())))
    await redis_client.set(keys.DEPLOYMENT_KEY.format(pipeline="web", number=7), b"{not json")
    assert await store.deployment("web", 7) is None
