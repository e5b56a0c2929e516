"""Lock hygiene end to end: reminders to a lock's holder once per period across two bots
sharing Redis, the channel told once when a lock expires, and the holder told when an admin
lifts their lock. The bots' clock is injected: nothing waits for real hours."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.lock_hygiene import LockHygiene
from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from app.tuning import Tuning
from tests.clocks import Clock
from tests.waiting import wait_until

CHANNEL = "C0CHAN"
ALICE, BOB, ADMIN = "U0USER", "U0BOB", "U0ADMIN"
START = 1_780_000_000.0
HOUR = 3600.0


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yml"
    path.write_text(f"admins: [{ADMIN}]\nlock_reminder_after: 4h\n")
    return path


def tuned(clock: Clock, lock_interval: float = 3600) -> Tuning:
    return dataclasses.replace(
        FAST, clock=clock, sweeps=dataclasses.replace(FAST.sweeps, lock_interval=lock_interval)
    )


@pytest.fixture
async def bots(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    clock: Clock,
    policy_file: Path,
) -> AsyncIterator[tuple[BotClient, BotClient]]:
    """Two replicas on one Redis, whose lock sweeps run every 50 ms."""
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_user(ADMIN, "admin", "admin@example.com")
    bk.add_pipeline("deploy-prod")
    tuning = tuned(clock, lock_interval=0.05)
    policy = str(policy_file)
    async with (
        running_bot(slack, bk, redis_url, tuning=tuning, policy_file=policy) as one,
        running_bot(slack, bk, redis_url, tuning=tuning, policy_file=policy) as two,
    ):
        yield one, two


def hygiene(bot: BotClient, clock: Clock) -> LockHygiene:
    s = bot.services
    return LockHygiene(s.policy, s.store, s.outbox, clock)


async def sweep_both(bots: tuple[BotClient, BotClient], clock: Clock) -> list[int]:
    """Both replicas sweep at the same moment (besides their own loops)."""
    counts = await asyncio.gather(*(hygiene(b, clock).sweep() for b in bots))
    for bot in bots:
        await bot.settled()
    return sorted(counts)


async def answer(bot: BotClient, text: str, **kwargs: Any) -> str:
    _, name, _ = await bot.command("/deploy", text, **kwargs)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return str(posts[-1].json.get("text", ""))


def dms(slack: FakeSlack, user: str) -> list[str]:
    return [str(c.args["text"]) for c in slack.posts(user)]


async def test_a_long_held_lock_reminds_its_holder_once_a_period_across_two_bots(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    one, _ = bots
    assert "locked `deploy-prod`" in await answer(one, "lock deploy-prod release &lt;!channel&gt;")
    assert await redis_client.zrange(keys.LOCKS_HELD_KEY, 0, -1) == [b"deploy-prod"]
    clock.now = START + 4 * HOUR - 60
    assert await sweep_both(bots, clock) == [0, 0]
    assert dms(slack, ALICE) == []

    clock.now = START + 4 * HOUR + 60
    (reminder,) = await slack.wait_for(lambda: dms(slack, ALICE))  # the bots' own loops
    assert reminder.startswith(":lock: You have held the lock on `deploy-prod` for 4 h 1 min")
    assert "(release &lt;!channel&gt;)" in reminder and "<!channel>" not in reminder
    assert "`/deploy unlock deploy-prod`" in reminder
    # Whoever sweeps next, in this period: nothing more.
    assert await sweep_both(bots, clock) == [0, 0]
    clock.now = START + 7 * HOUR
    assert await sweep_both(bots, clock) == [0, 0]
    assert len(dms(slack, ALICE)) == 1

    # The next period: one more, and that is all, even after a day of missed periods.
    clock.now = START + 8 * HOUR + 1
    await slack.wait_for(lambda: len(dms(slack, ALICE)) == 2)
    clock.now = START + 30 * HOUR
    await slack.wait_for(lambda: len(dms(slack, ALICE)) == 3)
    assert await sweep_both(bots, clock) == [0, 0]
    assert len(dms(slack, ALICE)) == 3
    assert "for 1 d 6 h" in dms(slack, ALICE)[-1]


async def test_an_expired_lock_is_told_to_its_channel_once(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    one, _ = bots
    assert "for 30m" in await answer(one, "lock deploy-prod 30m hotfix")
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 1
    clock.now = START + 31 * 60
    told = await slack.wait_for(
        lambda: [t for t in (c.args["text"] for c in slack.posts(CHANNEL)) if "expired" in t]
    )
    assert told == [
        ":unlock: The lock <@U0USER> took on `deploy-prod` (hotfix) has expired: anyone allowed "
        "may deploy it again."
    ]
    assert await sweep_both(bots, clock) == [0, 0]
    assert await redis_client.zcard(keys.LOCKS_HELD_KEY) == 0
    # The bots' clock decides: the lock is gone for everyone, though Redis's TTL has not run out.
    assert await redis_client.get(keys.PIPELINE_LOCK_KEY.format(pipeline="deploy-prod")) is None
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0
    # (Each test client names its response URLs r1, r2…: one client answers all the commands.)
    assert "Started" in await answer(one, "deploy-prod", user_id=BOB, user_name="bob")


async def test_a_lock_lifted_before_its_time_is_not_told_as_expired(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    one, _ = bots
    await answer(one, "lock deploy-prod 30m")
    assert "unlocked" in await answer(one, "unlock deploy-prod")
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0
    clock.now = START + 2 * HOUR
    assert await sweep_both(bots, clock) == [0, 0]
    assert not [c for c in slack.posts(CHANNEL) if "expired" in c.args["text"]]
    assert dms(slack, ALICE) == []  # lifted by its holder: nobody to tell


async def test_an_admin_who_lifts_a_lock_tells_its_holder(
    bots: tuple[BotClient, BotClient], slack: FakeSlack
) -> None:
    one, _ = bots
    await answer(one, "lock deploy-prod 2h migration")
    refused = await answer(one, "unlock deploy-prod", user_id=BOB, user_name="bob")
    assert "Only <@U0USER>, who locked `deploy-prod`, or an admin can unlock it." in refused
    assert dms(slack, ALICE) == []
    assert "unlocked" in await answer(one, "unlock deploy-prod", user_id=ADMIN, user_name="admin")
    (note,) = await slack.wait_for(lambda: dms(slack, ALICE))
    assert note == (
        ":unlock: <@U0ADMIN> lifted your lock on `deploy-prod` (migration). "
        "Others may deploy it again."
    )


async def test_an_expiry_no_bot_saw_for_hours_is_not_told_late(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    one, _ = bots
    await answer(one, "lock deploy-prod 30m")
    clock.now = START + 3 * HOUR  # the bots were away meanwhile (an hour late at most is told)
    await sweep_both(bots, clock)
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0
    assert await redis_client.get(keys.PIPELINE_LOCK_KEY.format(pipeline="deploy-prod")) is None
    assert not [c for c in slack.posts(CHANNEL) if "expired" in c.args["text"]]


async def test_an_expiry_note_slower_than_a_freeze_lease_is_not_posted_twice(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    # Slack rate-limits the note: the replica that took it waits out Retry-After (2 s here,
    # minutes in production) while, on the bots' clock, more than 2 minutes go by and the other
    # replica sweeps. The note's lease outlasts that: the other does not take it over.
    one, _ = bots
    await answer(one, "lock deploy-prod 30m hotfix")
    slack.fail_next("chat.postMessage", "ratelimited", retry_after=2)
    clock.now = START + 31 * 60

    def limited() -> list[Any]:
        return [c for c in slack.calls if c.method == "chat.postMessage" and c.status == 429]

    await slack.wait_for(limited)
    clock.now += FAST.sweeps.announce_lease + 1  # the lease it had before
    assert await sweep_both(bots, clock) == [0, 0]  # the first still waits out its 429

    def told() -> list[str]:
        return [t for t in (c.args["text"] for c in slack.posts(CHANNEL)) if "expired" in t]

    assert len(await slack.wait_for(told)) == 1

    async def noted_told() -> bool:
        return bool(await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0)

    await wait_until(noted_told, timeout=30, what="the expiry noted as told")
    for bot in bots:
        await bot.settled()
    assert len(told()) == 1
    # A crashed replica's note is retried after the lease, still within `announce_late`.
    assert FAST.sweeps.lock_expiry_lease < FAST.sweeps.announce_late
