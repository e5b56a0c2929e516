"""A DM about a finished build is sent exactly once across replicas, also when the replica
sending it is SIGKILLed mid-way and another takes its work over (issue 19)."""

from __future__ import annotations

import random
from collections import Counter

import redis.asyncio as redis

from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.fault_harness import SETTLE_S, Fleet, send_changes
from tests.test_faults import (  # noqa: F401 - the fault suite's fixtures, and its helpers
    add_channels,
    consumer_of,
    deploy_all,
    fault_redis,
    fleet,
    store_redis,
    unfinished,
    wait_for_finals,
)
from tests.waiting import wait_until

BUILDS = 24


def dm_keys(slack: FakeSlack) -> Counter[str]:
    """How often each DM key reached the DM with U0USER."""
    return Counter(
        str(call.args["metadata"]["event_payload"]["key"])
        for call in slack.posts("D0USER")
        if call.args.get("metadata")
    )


async def test_a_dm_is_sent_once_when_its_sender_is_killed(
    fleet: Fleet,  # noqa: F811 - the fixture imported above
    slack: FakeSlack,
    bk: FakeBuildkite,
    store_redis: redis.Redis,  # noqa: F811
) -> None:
    bots = await fleet.start(2)
    channels = add_channels(slack, 12)
    by_bot = await deploy_all(fleet, bots, BUILDS, channels)
    keys = sorted(key for started in by_bot.values() for key in started)
    rng = random.Random(19)
    await send_changes(fleet, [(key, "running") for key in keys], rng=rng)
    slack.latency = 0.15  # each Slack call takes a while: the victim dies with work in hand
    victim = bots[0]
    await send_changes(fleet, [(key, "failed") for key in keys], rng=rng)

    async def victim_holds_finals() -> bool:
        consumer = await consumer_of(store_redis, victim)
        if not consumer or not consumer["pending"]:
            return False
        held = await unfinished(store_redis, consumer["name"], bk)
        return "failed" in held.values()

    await wait_until(
        victim_holds_finals, timeout=30, what="the victim reads finals", describe=fleet.describe
    )
    victim.kill()
    slack.latency = 0.0
    await wait_for_finals(slack, bk, store_redis, keys, describe=fleet.describe)

    def every_dm_sent() -> bool:
        return len(dm_keys(slack)) == len(keys)

    await wait_until(every_dm_sent, timeout=SETTLE_S, what="a DM for every failed build")
    sent = dm_keys(slack)
    assert len(sent) == len(keys), sent
    assert all(count == 1 for count in sent.values()), {k: c for k, c in sent.items() if c > 1}
    leases = [key async for key in store_redis.scan_iter(match="{bkchatops}:dm:lease:*")]
    assert leases == []
