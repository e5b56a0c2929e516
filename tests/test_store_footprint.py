"""What one tracked build costs in a real Redis, measured with MEMORY USAGE (bytes are
deterministic for a given build), and that nothing of it outlives the final TTL."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis

from app.storage import keys
from app.storage.records import MessageTarget, Observation
from app.storage.store import Store
from app.tracking.phases import phase_of, snapshot
from buildkite.models import Build

#: A build as Buildkite's API returns it (shape of GET .../builds/{number}), with the lengths a
#: real one has: a 40-character sha, a merge commit message, a long branch, two people.
BUILD_ID = "0190a6e1-7c43-4d2b-9a55-3f1c2b8e9d10"
BUILD: dict[str, Any] = {
    "id": BUILD_ID,
    "graphql_id": "QnVpbGQtLS0wMTkwYTZlMS03YzQzLTRkMmItOWE1NS0zZjFjMmI4ZTlkMTA=",
    "url": "https://api.buildkite.com/v2/organizations/acme-inc/pipelines/payments-api/builds/4512",
    "web_url": "https://buildkite.com/acme-inc/payments-api/builds/4512",
    "number": 4512,
    "state": "running",
    "blocked": False,
    "blocked_state": "",
    "message": (
        "Merge pull request #1234 from acme-inc/feature/retry-payment-capture\n\n"
        "Retry payment capture when the gateway times out"
    ),
    "commit": "8f14e45fceea167a5a36dedd4bea2543b1c8a0f2",
    "branch": "feature/retry-payment-capture",
    "tag": None,
    "env": {},
    "source": "ui",
    "author": {"name": "Alice Example", "email": "alice@example.com"},
    "creator": {
        "id": "0182b3c4-d5e6-47f8-9a0b-1c2d3e4f5a6b",
        "graphql_id": "VXNlci0tLTAxODJiM2M0LWQ1ZTYtNDdmOC05YTBiLTFjMmQzZTRmNWE2Yg==",
        "name": "Alice Example",
        "email": "alice@example.com",
        "avatar_url": "https://www.gravatar.com/avatar/0bc83cb571cd1c50ba6f3e8a78ef1346",
        "created_at": "2021-03-04T05:06:07.890Z",
    },
    "created_at": "2026-01-09T09:26:50.971Z",
    "scheduled_at": "2026-01-09T09:26:50.934Z",
    "started_at": "2026-01-09T09:26:52.321Z",
    "finished_at": None,
    "meta_data": {"bkchatops": "1", "bkchatops:request": "Ev0123456789-1700000000.123456"},
    "jobs": [],
}
CHANNEL = "C07QX3N2B9K"
#: The Slack message's fields once posted, with a real response_url's length.
TARGET = MessageTarget(
    channel=CHANNEL,
    requester="U01ABCDEF23",
    ts="1736414812.123456",
    rendered="5f3c9a1e0b7d2c48",
    notify_url="https://hooks.slack.com/commands/T01ABCDEF23/7305981452101/Ab3dEf6hIj9kLmN0pQrStUv",
)
#: Budgets for one build: its record (one string) and its number index. Before the record was one
#: string it was two hashes in their large (hashtable) encoding and a key per posted reply:
#: about 2,000 bytes for such a build.
RECORD_BUDGET = 1024
INDEX_BUDGET = 144


async def observe(store: Store, build: Build) -> Observation:
    phase, rank = phase_of(build)
    return await store.observe(
        build.id, phase=phase, rank=rank, snapshot=snapshot(build), final=build.is_final,
        blocked=False,
    )  # fmt: skip


async def usage(client: redis.Redis) -> dict[str, tuple[int, str, int]]:
    """Every key of the bot: (MEMORY USAGE, OBJECT ENCODING, TTL)."""
    found = {}
    async for raw in client.scan_iter(match=keys.PREFIX + "*"):
        key = raw.decode()
        size = int(await client.memory_usage(key, samples=0) or 0)
        encoding = (await client.object("encoding", key)).decode()
        found[key] = (size, encoding, int(await client.ttl(key)))
    return found


async def test_a_tracked_build_fits_its_budget_in_compact_encodings(
    redis_client: redis.Redis,
) -> None:
    store = Store(redis_client)
    build = Build.model_validate(BUILD)
    phase, rank = phase_of(build)
    await store.track(
        BUILD_ID,
        pipeline="payments-api",
        number=build.number,
        target=TARGET.model_copy(update={"ts": None, "rendered": ""}),
        phase=phase,
        rank=rank,
        snapshot=snapshot(build),
        final=False,
    )
    await store.save_target(BUILD_ID, TARGET)
    await store.mark_posted(BUILD_ID, CHANNEL, 0, "running")
    found = await usage(redis_client)
    record = keys.BUILD_KEY.format(build_id=BUILD_ID)
    index = keys.BY_NUMBER_KEY.format(pipeline="payments-api", number=build.number)
    assert set(found) == {record, index, keys.PENDING_KEY, keys.EVENTS_STREAM}
    assert not [key for key, (_, encoding, _) in found.items() if encoding == "hashtable"]
    assert found[record][1] == "raw"  # one string: no listpack limit to fall over
    assert found[record][0] <= RECORD_BUDGET, found[record]
    assert found[index][0] <= INDEX_BUDGET, found[index]
    tracked = await store.get(BUILD_ID)
    assert tracked is not None and tracked.targets == [TARGET]
    # What the messages show comes back whole (a person's id is not kept: it is never shown).
    shown: Any = {name: True for name in snapshot(build)} | {
        person: {"name", "email"} for person in ("author", "creator")
    }
    kept = Build.model_validate(tracked.snapshot)
    assert kept.model_dump(include=shown) == build.model_dump(include=shown)


async def test_nothing_of_a_final_build_outlives_the_final_ttl(redis_client: redis.Redis) -> None:
    store = Store(redis_client)
    build = Build.model_validate(BUILD)
    phase, rank = phase_of(build)
    await store.track(
        BUILD_ID, pipeline="payments-api", number=build.number, target=TARGET, phase=phase,
        rank=rank, snapshot=snapshot(build), final=False,
    )  # fmt: skip
    await store.mark_posted(BUILD_ID, CHANNEL, 0, "running")
    failing = Build.model_validate({**BUILD, "state": "failing"})
    assert await observe(store, failing) == Observation.changed("running")
    await store.mark_posted(BUILD_ID, CHANNEL, 0, "failing")
    failed = Build.model_validate({**BUILD, "state": "failed", "finished_at": BUILD["started_at"]})
    assert await observe(store, failed) == Observation.changed("failing")
    await store.mark_posted(BUILD_ID, CHANNEL, 0, "final")
    assert await store.once(BUILD_ID, 0, "final") is True
    assert await store.count_auto_retry(BUILD_ID) == 1
    await store.save_target(BUILD_ID, TARGET.model_copy(update={"rendered": "0123456789abcdef"}))
    assert await store.pending() == []
    found = await usage(redis_client)
    per_build = {key: ttl for key, (_, _, ttl) in found.items() if key != keys.EVENTS_STREAM}
    assert per_build == {
        keys.BUILD_KEY.format(build_id=BUILD_ID): per_build[
            keys.BUILD_KEY.format(build_id=BUILD_ID)
        ],
        keys.BY_NUMBER_KEY.format(pipeline="payments-api", number=4512): per_build[
            keys.BY_NUMBER_KEY.format(pipeline="payments-api", number=4512)
        ],
    }
    assert all(keys.FINAL_TTL - 5 < ttl <= keys.FINAL_TTL for ttl in per_build.values())
    assert found[keys.BUILD_KEY.format(build_id=BUILD_ID)][0] <= RECORD_BUDGET, found
