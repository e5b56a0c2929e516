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

from app.storage import keys
from app.storage.records import (
    REGRESSED,
    UNCHANGED,
    AuditEntry,
    MessageTarget,
    Observation,
    PendingDeploy,
    PipelineLock,
    PollState,
)
from app.storage.records import ApprovalDecision as Decision
from app.storage.records import ApprovalStatus as Status
from app.storage.store import Store
from app.tuning import DEFAULT, TrackingTuning, Tuning
from tests.waiting import wait_until

CHANNEL = "C0CHAN"
changed = Observation.changed


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
) -> Observation:
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
    assert await observe(store, "running", 2) == changed("scheduled")
    assert await observe(store, "running", 2) == UNCHANGED  # the same phase again: no transition
    assert await observe(store, "scheduled", 1) == REGRESSED  # a late webhook changes nothing
    assert (await store.get("b1")).phase == "running"  # type: ignore[union-attr]
    assert await observe(store, "failing", 3, snapshot={"state": "failing", "n": 1}) == changed(
        "running"
    )
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
    assert results.count(changed("scheduled")) == 1
    assert results.count(UNCHANGED) == 9


async def test_a_final_state_retires_the_build_from_pending(store: Store) -> None:
    await track(store)
    assert await store.pending() == ["b1"]
    assert await observe(store, "passed", keys.FINAL_RANK, final=True) == changed("scheduled")
    assert await store.pending() == []
    assert await store.pending_count() == 0
    assert await ttl(store, keys.BUILD_KEY.format(build_id="b1")) <= keys.FINAL_TTL
    assert await observe(store, "running", 2) == REGRESSED
    assert await store.pending() == []  # a late webhook does not bring it back


async def test_leaving_a_block_step_needs_a_reset(store: Store) -> None:
    """The blocked exception: a build on a block step goes back to running once unblocked."""
    await track(store)
    assert await observe(store, "passed:blocked", 4, blocked=True) == changed("scheduled")
    assert await observe(store, "running", 2) == REGRESSED
    assert await store.reset("b1", new_generation=False) == 0
    assert await observe(store, "running", 2) == changed("passed:blocked")
    assert (await store.get("b1")).gen == 0  # type: ignore[union-attr]


async def test_a_finished_build_run_again_is_reopened_in_a_new_generation(store: Store) -> None:
    await track(store)
    await observe(store, "failed", keys.FINAL_RANK, final=True)
    assert await store.reset("b1", new_generation=True) == 1
    assert await store.pending() == ["b1"]
    assert await observe(store, "running", 2) == changed("failed")
    assert (await store.get("b1")).gen == 1  # type: ignore[union-attr]
    assert await store.reset("untracked", new_generation=True) is None


async def test_an_untracked_build_is_not_recorded(store: Store) -> None:
    await store.redis.zadd(keys.PENDING_KEY, {"ghost": 1.0})
    assert await observe(store, "running", 2, build_id="ghost") == UNCHANGED
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


async def test_posted_and_once_guards_live_in_the_build_record(store: Store) -> None:
    await track(store)
    assert not await store.was_posted("b1", CHANNEL, 0, "final")
    await store.mark_posted("b1", CHANNEL, 0, "final")
    assert await store.was_posted("b1", CHANNEL, 0, "final")
    assert not await store.was_posted("b1", CHANNEL, 1, "final")
    assert not await store.was_posted("b1", "C0OTHER", 0, "final")
    assert await store.once("b1", 0, "final") is True
    assert await store.once("b1", 0, "final") is False
    assert await store.once("b1", 1, "final") is True
    # Nothing is marked for a build no longer tracked, and no key is made for it.
    await store.mark_posted("gone", CHANNEL, 0, "final")
    assert not await store.was_posted("gone", CHANNEL, 0, "final")
    assert await store.once("gone", 0, "final") is False
    assert await store.redis.keys(keys.PREFIX + "*gone*") == []
    # One key per build (and its number index), under the record's TTL.
    assert sorted(await store.redis.keys(keys.PREFIX + "*")) == sorted(
        [
            keys.BUILD_KEY.format(build_id="b1").encode(),
            keys.BY_NUMBER_KEY.format(pipeline="web", number=1).encode(),
            keys.PENDING_KEY.encode(),
            keys.EVENTS_STREAM.encode(),
        ]
    )
    assert await ttl(store, keys.BUILD_KEY.format(build_id="b1")) > keys.PENDING_TTL - 5


async def test_concurrent_once_lets_one_caller_through(store: Store) -> None:
    await track(store)
    results = await asyncio.gather(*(store.once("b1", 0, "final") for _ in range(10)))
    assert results.count(True) == 1


async def test_build_locks_belong_to_their_holder(store: Store) -> None:
    token = await store.acquire_lock("b1")
    assert token is not None
    assert await store.acquire_lock("b1") is None
    key = keys.BUILD_LOCK_KEY.format(build_id="b1")
    assert 0 < await store.redis.pttl(key) <= DEFAULT.tracking.lock_ttl_ms
    await store.release_lock("b1", "someone-else")
    assert await store.acquire_lock("b1") is None  # not released by a stranger
    assert await store.renew_lock("b1", token) is True
    assert await store.renew_lock("b1", "someone-else") is False
    await store.release_lock("b1", token)
    assert await store.renew_lock("b1", token) is False
    assert await store.acquire_lock("b1") is not None


async def test_the_build_lock_lives_as_long_as_the_tuning_says(store: Store) -> None:
    short = Store(store.redis, Tuning(tracking=TrackingTuning(lock_ttl_ms=50_000)))
    token = await short.acquire_lock("b1")
    assert token is not None
    key = keys.BUILD_LOCK_KEY.format(build_id="b1")
    assert 40_000 < await store.redis.pttl(key) <= 50_000
    # Nearly run out (but not so near that a stalled test process lets it expire first).
    await store.redis.pexpire(key, 5_000)
    assert await short.renew_lock("b1", token) is True
    assert 40_000 < await store.redis.pttl(key) <= 50_000


async def test_one_poller_per_lease(store: Store) -> None:
    assert await store.acquire_poll_lease("p1", 1_000) is True
    assert await store.acquire_poll_lease("p2", 1_000) is False
    # Once p1's lease runs out by itself, p2 gets it (however late this process looks).
    await wait_until(
        lambda: store.acquire_poll_lease("p2", 1_000), timeout=30, what="p2 holds the lease"
    )
    assert await store.redis.get(keys.POLL_LEASE_KEY) == b"p2"
    assert await store.poll_state() == PollState()
    await store.save_poll_state(finished_from=1234.5, failures=2, backoff="rate_limited")
    await store.save_poll_state(resume_at=1300.0)
    assert await store.poll_state() == PollState(
        finished_from=1234.5, resume_at=1300.0, failures=2, backoff="rate_limited"
    )
    assert 0 < await ttl(store, keys.POLL_STATE_KEY) <= keys.PENDING_TTL
    await store.end_poll_backoff()
    assert await store.poll_state() == PollState(finished_from=1234.5)


# -- the commands the rest of the store relies on ------------------------------------------------


async def test_deploy_locks_requests_approvals_and_audit(store: Store) -> None:
    """Not the policy's rules (tests/test_policy*.py), only that both backends run them."""
    assert await store.lock_pipeline("web", user="U1", reason="r", ttl=60, now=1.0) is None
    held = await store.lock_pipeline("web", user="U2", reason="r", ttl=60, now=2.0)
    assert held == PipelineLock(pipeline="web", user="U1", reason="r", since=1.0, expires_at=61.0)
    assert [lock.pipeline for lock in await store.pipeline_locks()] == ["web"]
    assert await store.unlock_pipeline("web") is True
    request = PendingDeploy(plan={"pipeline": "web"}, user_name="ann")
    await store.save_deploy_request("d1", request)
    assert await store.take_deploy_request("d1") == request
    assert await store.take_deploy_request("d1") is None
    now = time.time()
    await store.create_approval("a1", request, expires_at=now + 60)
    assert await store.due_approvals(now + 61) == ["a1"]
    approved = await store.decide_approval("a1", status=Status.APPROVED, user="U2", now=now)
    assert approved is Decision.DECIDED
    late = await store.decide_approval("a1", status=Status.REJECTED, user="U3", now=now)
    assert late is Decision.APPROVED
    approval = await store.approval("a1")
    assert approval is not None and approval.request == request
    assert (approval.status, approval.decided_by) == (Status.APPROVED, "U2")
    await store.audit(AuditEntry(pipeline="web", action="deploy"))
    await store.audit(AuditEntry(pipeline="api", action="deploy"))
    assert [e.pipeline for e in await store.audit_entries(pipeline=None, limit=5)] == [
        "api",
        "web",
    ]
    assert await store.swap_outcome("web", "main", "failed") is None
    assert await store.swap_outcome("web", "main", "passed") == "failed"


# -- the build record ----------------------------------------------------------------------------


async def test_a_record_keeps_its_snapshot_and_messages_through_every_script(store: Store) -> None:
    """Lua re-encodes the record on each change: text, unicode, slashes and booleans survive."""
    snapshot = {
        "id": "b1",
        "number": 1,
        "state": "failing",
        "blocked": False,
        "web_url": "https://buildkite.com/acme/web/builds/1",
        "message": 'Fix the 🐛 in «ünïcode» / "quotes"\n\nSecond\tline \\ end',
        "author": {"id": "u1", "name": "Zoë", "email": "zoe@example.com", "avatar": None},
        "created_at": "2026-01-09T09:26:50.971000Z",
        "started_at": "2026-01-09T09:26:52.123456Z",
        "finished_at": None,
        "custom": {"nested": True},
    }
    await track(store, phase="running", rank=2, snapshot=snapshot)
    await store.observe(
        "b1", phase="failing", rank=3, snapshot=snapshot, final=False, blocked=False
    )
    target = MessageTarget(
        channel=CHANNEL,
        requester="U0USER",
        ts="1700000000.000100",
        rendered="0123456789abcdef",
        notify_url="https://hooks.slack.com/commands/T0123/1234567890123/AbCdEf",
        thread_ts="1690000000.000200",
    )
    await store.save_target("b1", target)
    await store.mark_retried("b1")
    assert await store.count_auto_retry("b1") == 1
    assert await store.count_auto_retry("b1") == 2
    tracked = await store.get("b1")
    assert tracked is not None
    # Kept as shown: no None values, no person's id, times to the millisecond as numbers.
    assert tracked.snapshot == {
        **{name: value for name, value in snapshot.items() if value is not None},
        "author": {"name": "Zoë", "email": "zoe@example.com"},
        "created_at": "2026-01-09T09:26:50.971Z",
    }
    assert tracked.targets == [target]
    assert tracked.retried is True
    assert (tracked.phase, tracked.gen) == ("failing", 0)
    assert await store.count_auto_retry("untracked") > 1000  # no attempts for what is not followed


async def test_a_second_channel_joins_the_record_with_a_transition_of_its_own(store: Store) -> None:
    await track(store)
    assert await track(store, channel="C0OTHER") is True
    tracked = await store.get("b1")
    assert tracked is not None and [t.channel for t in tracked.targets] == [CHANNEL, "C0OTHER"]
    await store.ensure_group()
    joined = (await store.read_transitions("c1", block_ms=10))[-1]
    assert (joined.channel, joined.old, joined.new) == ("C0OTHER", "scheduled", "scheduled")


async def test_number_index_and_record_expire_together(store: Store) -> None:
    await track(store)
    record, index = (
        keys.BUILD_KEY.format(build_id="b1"),
        keys.BY_NUMBER_KEY.format(pipeline="web", number=1),
    )
    await observe(store, "passed", keys.FINAL_RANK, final=True)
    for key in (record, index):
        assert keys.FINAL_TTL - 5 < await ttl(store, key) <= keys.FINAL_TTL
    assert await store.reset("b1", new_generation=True) == 1  # run again: followed for longer
    for key in (record, index):
        assert keys.FINAL_TTL < await ttl(store, key) <= keys.PENDING_TTL


async def test_stopped_processes_consumers_are_forgotten_but_not_their_work(store: Store) -> None:
    for number in (1, 2, 3):
        await track(store, f"b{number}", number=number)
    await store.ensure_group()
    (done,) = await store.read_transitions("gone-finished", count=1, block_ms=10)
    await store.ack_transition(done.entry_id)
    (held,) = await store.read_transitions("gone-holding", count=1, block_ms=10)
    (mine,) = await store.read_transitions("me", count=1, block_ms=10)
    await store.ack_transition(mine.entry_id)

    async def names() -> set[str]:
        consumers = await store.redis.xinfo_consumers(keys.EVENTS_STREAM, keys.EVENTS_GROUP)
        return {
            c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers
        }

    # Not idle long enough: all stay.
    assert await store.forget_idle_consumers("me", idle_ms=60_000) == []
    # Idle long enough: only the one with nothing pending goes; our own name always stays.
    assert await store.forget_idle_consumers("me", idle_ms=0) == ["gone-finished"]
    assert await names() == {"gone-holding", "me"}
    # What the other one holds is still there to be taken over.
    (taken,) = await store.reclaim_transitions("me", min_idle_ms=0)
    assert taken.entry_id == held.entry_id
