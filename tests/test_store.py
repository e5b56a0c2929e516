"""The store's contract, held by both backends: a real Redis, and the embedded in-process one.

Every test runs twice: against the throwaway redis-server (flushed per test) and against the
fakeredis store the bot uses when REDIS_URL is unset, so the embedded store cannot drift.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest

from app import store as keys
from app.store import REGRESSED, MessageTarget, Store

CHANNEL = "C0CHAN"


@pytest.fixture(params=["redis", "embedded"])
async def store(request: pytest.FixtureRequest, redis_client: Any) -> AsyncIterator[Store]:
    if request.param == "redis":
        yield Store(redis_client)
        return
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        yield Store(client)
    finally:
        await client.aclose()


async def track(store: Store, build_id: str = "b1", number: int = 1, **kwargs: Any) -> bool:
    values: dict[str, Any] = {
        "phase": "scheduled",
        "rank": 1,
        "snapshot": {"state": "scheduled"},
        "final": False,
    }
    values.update(kwargs)
    target = MessageTarget(channel=values.pop("channel", CHANNEL), requester="U0USER")
    return await store.track(build_id, pipeline="web", number=number, target=target, **values)


async def observe(
    store: Store, phase: str, rank: int, build_id: str = "b1", **kwargs: Any
) -> str | None:
    values: dict[str, Any] = {"snapshot": {"state": phase}, "final": False, "blocked": False}
    values.update(kwargs)
    return await store.observe(build_id, phase=phase, rank=rank, **values)


async def ttl(store: Store, key: str) -> int:
    return int(await store.redis.ttl(key))


async def test_ping(store: Store) -> None:
    assert await store.ping() is True


# -- requests ------------------------------------------------------------------------------------


async def test_a_request_is_claimed_once_until_released(store: Store) -> None:
    assert await store.claim_request("req-1", "U1") is None
    assert await store.claim_request("req-1", "U2") == "U1"
    assert 0 < await ttl(store, keys.REQUEST_KEY.format(request_id="req-1")) <= keys.REQUEST_TTL
    await store.release_request("req-1")
    assert await store.claim_request("req-1", "U2") is None
    assert await store.claim_request("click", "U1", ttl=keys.ACTION_TTL) is None
    assert 0 < await ttl(store, keys.REQUEST_KEY.format(request_id="click")) <= keys.ACTION_TTL


# -- tracking: track, observe, reset -------------------------------------------------------------


async def test_track_records_the_build_once_and_emits_its_first_transition(store: Store) -> None:
    assert await track(store) is True
    assert await track(store) is False  # the same channel again
    tracked = await store.get("b1")
    assert tracked is not None
    assert (tracked.pipeline, tracked.number, tracked.phase, tracked.gen) == (
        "web",
        1,
        "scheduled",
        0,
    )
    assert [t.channel for t in tracked.targets] == [CHANNEL]
    assert (await store.find("web", 1)) == tracked
    assert await store.find("web", 2) is None
    assert await store.get("nope") is None
    for key in (
        keys.BUILD_KEY.format(build_id="b1"),
        keys.BY_NUMBER_KEY.format(pipeline="web", number=1),
    ):
        assert keys.PENDING_TTL - 5 < await ttl(store, key) <= keys.PENDING_TTL
    await store.ensure_group()
    (first,) = await store.read_transitions("c1", block_ms=10)
    assert (first.build_id, first.old, first.new, first.gen) == ("b1", "", "scheduled", 0)


async def test_observe_is_a_compare_and_set_that_only_moves_forward(store: Store) -> None:
    await track(store)
    assert await observe(store, "running", 2) == "scheduled"
    assert await observe(store, "running", 2) is None  # the same phase again: no transition
    assert await observe(store, "scheduled", 1) == REGRESSED  # a late webhook changes nothing
    assert (await store.get("b1")).phase == "running"  # type: ignore[union-attr]
    assert await observe(store, "failing", 3, snapshot={"state": "failing", "n": 1}) == "running"
    tracked = await store.get("b1")
    assert tracked is not None and tracked.snapshot == {"state": "failing", "n": 1}
    await store.ensure_group()
    transitions = await store.read_transitions("c1", block_ms=10)
    assert [(t.old, t.new) for t in transitions] == [
        ("", "scheduled"),
        ("scheduled", "running"),
        ("running", "failing"),
    ]


async def test_concurrent_observers_emit_one_transition(store: Store) -> None:
    await track(store)
    results = await asyncio.gather(*(observe(store, "running", 2) for _ in range(10)))
    assert results.count("scheduled") == 1
    assert results.count(None) == 9


async def test_a_final_state_retires_the_build_from_pending(store: Store) -> None:
    await track(store)
    assert await store.pending() == ["b1"]
    assert await observe(store, "passed", keys.FINAL_RANK, final=True) == "scheduled"
    assert await store.pending() == []
    assert await store.pending_count() == 0
    assert await ttl(store, keys.BUILD_KEY.format(build_id="b1")) <= keys.FINAL_TTL
    assert await observe(store, "running", 2) == REGRESSED
    assert await store.pending() == []  # a late webhook does not bring it back


async def test_leaving_a_block_step_needs_a_reset(store: Store) -> None:
    """The blocked exception: a build on a block step goes back to running once unblocked."""
    await track(store)
    assert await observe(store, "passed:blocked", 4, blocked=True) == "scheduled"
    assert await observe(store, "running", 2) == REGRESSED
    assert await store.reset("b1", new_generation=False) == 0
    assert await observe(store, "running", 2) == "passed:blocked"
    assert (await store.get("b1")).gen == 0  # type: ignore[union-attr]


async def test_a_finished_build_run_again_is_reopened_in_a_new_generation(store: Store) -> None:
    await track(store)
    await observe(store, "failed", keys.FINAL_RANK, final=True)
    assert await store.reset("b1", new_generation=True) == 1
    assert await store.pending() == ["b1"]
    assert await observe(store, "running", 2) == "failed"
    assert (await store.get("b1")).gen == 1  # type: ignore[union-attr]
    assert await store.reset("untracked", new_generation=True) is None


async def test_an_untracked_build_is_not_recorded(store: Store) -> None:
    await store.redis.zadd(keys.PENDING_KEY, {"ghost": 1.0})
    assert await observe(store, "running", 2, build_id="ghost") is None
    assert await store.pending() == []
    assert not await store.redis.exists(keys.BUILD_KEY.format(build_id="ghost"))


async def test_pending_by_last_seen_with_a_limit(store: Store) -> None:
    for n, seen in ((1, 100.0), (2, 200.0), (3, 300.0)):
        await track(store, f"b{n}", number=n)
        await observe(store, "running", 2, build_id=f"b{n}", now=seen)
    assert await store.pending() == ["b1", "b2", "b3"]
    assert await store.pending(seen_before=250.0) == ["b1", "b2"]
    assert await store.pending(seen_before=250.0, limit=1) == ["b1"]
    await store.forget_pending("b1")
    assert await store.pending() == ["b2", "b3"]
    assert await store.pending_count() == 2


# -- the events stream ---------------------------------------------------------------------------


async def test_transitions_are_read_once_reclaimed_when_stuck_and_acked(store: Store) -> None:
    await store.ensure_group()
    await store.ensure_group()  # a second process starting is fine
    await track(store)
    await observe(store, "running", 2)
    first = await store.read_transitions("c1", block_ms=10)
    assert [t.new for t in first] == ["scheduled", "running"]
    assert await store.read_transitions("c2", block_ms=10) == []  # each entry goes to one reader
    assert await store.reclaim_transitions("c2", min_idle_ms=60_000) == []  # c1 is still on it
    await asyncio.sleep(0.05)
    taken = await store.reclaim_transitions("c2", min_idle_ms=20)
    assert [t.entry_id for t in taken] == [t.entry_id for t in first]
    assert await store.delivery_count(first[0].entry_id) == 2
    for transition in taken:
        await store.ack_transition(transition.entry_id)
    await asyncio.sleep(0.05)
    assert await store.reclaim_transitions("c3", min_idle_ms=0) == []
    assert await store.delivery_count(first[0].entry_id) == 0
    t0 = time.monotonic()
    assert await store.read_transitions("c1", block_ms=100) == []
    assert time.monotonic() - t0 >= 0.05  # it blocked, without spinning


# -- guards, locks and the poll lease ------------------------------------------------------------


async def test_posted_guards(store: Store) -> None:
    assert not await store.was_posted("b1", CHANNEL, 0, "final")
    await store.mark_posted("b1", CHANNEL, 0, "final")
    assert await store.was_posted("b1", CHANNEL, 0, "final")
    assert not await store.was_posted("b1", CHANNEL, 1, "final")
    assert not await store.was_posted("b1", "C0OTHER", 0, "final")
    key = keys.POSTED_KEY.format(build_id="b1", channel=CHANNEL, gen=0, kind="final")
    assert 0 < await ttl(store, key) <= keys.POSTED_TTL


async def test_build_locks_belong_to_their_holder(store: Store) -> None:
    token = await store.acquire_lock("b1")
    assert token is not None
    assert await store.acquire_lock("b1") is None
    key = keys.BUILD_LOCK_KEY.format(build_id="b1")
    assert 0 < await store.redis.pttl(key) <= keys.LOCK_TTL_MS
    await store.release_lock("b1", "someone-else")
    assert await store.acquire_lock("b1") is None  # not released by a stranger
    assert await store.renew_lock("b1", token) is True
    assert await store.renew_lock("b1", "someone-else") is False
    await store.release_lock("b1", token)
    assert await store.renew_lock("b1", token) is False
    assert await store.acquire_lock("b1") is not None


async def test_one_poller_per_lease(store: Store) -> None:
    assert await store.acquire_poll_lease("p1", 50) is True
    assert await store.acquire_poll_lease("p2", 50) is False
    await asyncio.sleep(0.1)
    assert await store.acquire_poll_lease("p2", 50) is True
    assert await store.poll_state() == keys.PollState()
    await store.save_poll_state(finished_from=1234.5, failures=2, backoff="rate_limited")
    await store.save_poll_state(resume_at=1300.0)
    assert await store.poll_state() == keys.PollState(
        finished_from=1234.5, resume_at=1300.0, failures=2, backoff="rate_limited"
    )
    assert 0 < await ttl(store, keys.POLL_STATE_KEY) <= keys.PENDING_TTL
    await store.end_poll_backoff()
    assert await store.poll_state() == keys.PollState(finished_from=1234.5)


# -- the commands the rest of the store relies on ------------------------------------------------


async def test_deploy_locks_requests_approvals_and_audit(store: Store) -> None:
    """Not the policy's rules (tests/test_policy*.py), only that both backends run them."""
    assert await store.lock_pipeline("web", user="U1", reason="r", ttl=60, now=1.0) is None
    held = await store.lock_pipeline("web", user="U2", reason="r", ttl=60, now=2.0)
    assert held is not None and held["user"] == "U1"
    assert [lock["pipeline"] for lock in await store.pipeline_locks()] == ["web"]
    assert await store.unlock_pipeline("web") is True
    await store.save_deploy_request("d1", {"pipeline": "web"})
    assert await store.take_deploy_request("d1") == {"pipeline": "web"}
    assert await store.take_deploy_request("d1") is None
    now = time.time()
    await store.create_approval("a1", {"pipeline": "web"}, expires_at=now + 60)
    assert await store.due_approvals(now + 61) == ["a1"]
    assert await store.decide_approval("a1", status="approved", user="U2", now=now) == "ok"
    assert await store.decide_approval("a1", status="rejected", user="U3", now=now) == "approved"
    await store.audit({"pipeline": "web", "action": "deploy"})
    await store.audit({"pipeline": "api", "action": "deploy"})
    assert [e["pipeline"] for e in await store.audit_entries(pipeline=None, limit=5)] == [
        "api",
        "web",
    ]
    assert await store.swap_outcome("web", "main", "failed") is None
    assert await store.swap_outcome("web", "main", "passed") == "failed"
