"""Lock hygiene at its edges: a lock taken by a release before the sweep's indexes (or by a
process that died between its lock and its index entry) is reminded of and told at its expiry
all the same; a lock held by an agent reminds the person it acts for, or nobody (no DM is
tried to an id Slack does not know); an expiry note Slack fails for now is told by a later
sweep, once, and one it refuses for good is dropped."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from app.storage.records import PipelineLock
from tests.clocks import Clock
from tests.test_lock_hygiene import (
    ALICE,
    CHANNEL,
    HOUR,
    START,
    answer,
    dms,
    sweep_both,
    tuned,
)

TOKEN = "a" * 40


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def bots(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    clock: Clock,
    policy_file: Path,
) -> AsyncIterator[tuple[BotClient, BotClient]]:
    """Two replicas on one Redis, whose own lock sweeps wait for the test's."""
    for slug in ("deploy-prod", "deploy-api"):
        bk.add_pipeline(slug)
    tuning = tuned(clock)
    policy = str(policy_file)
    async with (
        running_bot(slack, bk, redis_url, tuning=tuning, policy_file=policy) as one,
        running_bot(slack, bk, redis_url, tuning=tuning, policy_file=policy) as two,
    ):
        yield one, two


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    sha = hashlib.sha256(TOKEN.encode()).hexdigest()
    path = tmp_path / "policy.yml"
    path.write_text(
        "admins: [U0ADMIN]\nlock_reminder_after: 4h\n"
        f'agents:\n  captain:\n    token_sha256: "{sha}"\n    acts_for: {ALICE}\n'
        f'  loner:\n    token_sha256: "{sha[::-1]}"\n'
    )
    return path


async def old_lock(redis_client: Any, pipeline: str, user: str, **extra: Any) -> None:
    """A lock as a release without the indexes left it: its key alone."""
    lock = PipelineLock(pipeline=pipeline, user=user, reason="old", since=START - 5 * HOUR, **extra)
    await redis_client.set(keys.PIPELINE_LOCK_KEY.format(pipeline=pipeline), lock.model_dump_json())


async def test_a_lock_taken_before_the_indexes_is_reminded_and_told_at_its_expiry(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    await old_lock(redis_client, "deploy-prod", ALICE)
    await old_lock(redis_client, "deploy-api", "U0BOB", channel=CHANNEL, expires_at=START + HOUR)
    # As after an upgrade: the locks were there before the new release's first sweep (the
    # bots' own first sweeps ran at their start and may still be running: whichever indexes
    # next sees both).
    await redis_client.delete(keys.LOCKS_INDEXED_KEY)
    await sweep_both(bots, clock)
    await slack.wait_for(lambda: len(dms(slack, ALICE)) == 1 and len(dms(slack, "U0BOB")) == 1)
    assert "You have held the lock on `deploy-prod` for 5 h" in dms(slack, ALICE)[0]
    assert await redis_client.ttl(keys.LOCKS_INDEXED_KEY) > 0
    clock.now = START + HOUR + 60
    await sweep_both(bots, clock)
    told = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "expired" in str(c.args["text"])]
    )
    assert len(told) == 1 and "deploy-api" in told[0].args["text"]
    await sweep_both(bots, clock)
    assert len([c for c in slack.posts(CHANNEL) if "expired" in str(c.args["text"])]) == 1


async def test_an_agents_lock_reminds_the_person_it_acts_for_or_nobody(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    await old_lock(redis_client, "deploy-prod", "agent:captain")
    await old_lock(redis_client, "deploy-api", "agent:loner")
    await redis_client.delete(keys.LOCKS_INDEXED_KEY)
    await sweep_both(bots, clock)
    await slack.wait_for(lambda: len(dms(slack, ALICE)) == 1)
    await sweep_both(bots, clock)
    assert "`deploy-prod`" in dms(slack, ALICE)[0]
    tried = [c.args.get("channel") for c in slack.calls if c.method == "chat.postMessage"]
    assert not [c for c in tried if str(c).startswith("agent:")]


def expiry_notes(slack: FakeSlack) -> list[str]:
    return [t for t in (str(c.args["text"]) for c in slack.posts(CHANNEL)) if "expired" in t]


def tries_to_post(slack: FakeSlack) -> int:
    return len([c for c in slack.calls if c.method == "chat.postMessage"])


@pytest.mark.parametrize(
    ("error", "status", "n"),
    [
        # A rate limit the Slack client's own waits could not outlast (5 retries).
        ("ratelimited", 429, 6),
        # A 5xx on each of the outbox's tries (it looks for the post between them).
        ("internal_error", 500, 3),
    ],
)
async def test_an_expiry_note_slack_fails_for_now_is_told_by_a_later_sweep_once(
    bots: tuple[BotClient, BotClient],
    slack: FakeSlack,
    clock: Clock,
    redis_client: Any,
    error: str,
    status: int,
    n: int,
) -> None:
    one, _ = bots
    assert "for 30m" in await answer(one, "lock deploy-prod 30m hotfix")
    slack.fail_next("chat.postMessage", error, status=status, retry_after=0, n=n)
    clock.now = START + 31 * 60
    assert await sweep_both(bots, clock) == [0, 0]
    assert expiry_notes(slack) == []
    assert tries_to_post(slack) == n  # one replica tried; the other found it taken
    # The lock is gone all the same; its note waits for the next sweep, of either replica.
    assert await redis_client.get(keys.PIPELINE_LOCK_KEY.format(pipeline="deploy-prod")) is None
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 1

    clock.now += 60
    assert await sweep_both(bots, clock) == [0, 1]
    assert expiry_notes(slack) == [
        ":unlock: The lock <@U0USER> took on `deploy-prod` (hotfix) has expired: anyone allowed "
        "may deploy it again."
    ]
    # The retry looked in the channel first (a 5xx may have posted it after all).
    assert [c.args["channel"] for c in slack.calls if c.method == "conversations.history"]
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0
    clock.now += 60
    assert await sweep_both(bots, clock) == [0, 0]
    assert len(expiry_notes(slack)) == 1


async def test_an_expiry_note_slack_refuses_for_good_is_dropped_with_one_log_line(
    bots: tuple[BotClient, BotClient],
    slack: FakeSlack,
    clock: Clock,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    one, _ = bots
    await answer(one, "lock deploy-prod 30m")
    slack.fail_next("chat.postMessage", "channel_not_found")
    clock.now = START + 31 * 60
    with caplog.at_level(logging.INFO, logger="app.core.lock_hygiene"):
        assert await sweep_both(bots, clock) == [0, 0]
        clock.now += 60
        assert await sweep_both(bots, clock) == [0, 0]
    assert tries_to_post(slack) == 1
    assert expiry_notes(slack) == []
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "app.core.lock_hygiene"]
    assert line.startswith("expiry of the lock on deploy-prod not told in C0CHAN, dropped:")
    assert "channel_not_found" in line


async def test_an_expiry_note_slack_fails_for_over_an_hour_is_no_longer_told(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    one, _ = bots
    await answer(one, "lock deploy-prod 30m")
    slack.fail_next("chat.postMessage", "ratelimited", retry_after=0, n=6)
    clock.now = START + 31 * 60
    assert await sweep_both(bots, clock) == [0, 0]
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 1
    clock.now = START + 30 * 60 + HOUR + 1  # news of the past by now
    assert await sweep_both(bots, clock) == [0, 0]
    assert tries_to_post(slack) == 6
    assert expiry_notes(slack) == []
    assert await redis_client.zcard(keys.LOCK_EXPIRY_KEY) == 0


async def test_an_agents_expired_lock_is_told_with_its_name_not_a_mention(
    bots: tuple[BotClient, BotClient], slack: FakeSlack, clock: Clock, redis_client: Any
) -> None:
    await old_lock(
        redis_client, "deploy-api", "agent:captain", channel=CHANNEL, expires_at=START + HOUR
    )
    await redis_client.delete(keys.LOCKS_INDEXED_KEY)
    clock.now = START + HOUR + 60
    await sweep_both(bots, clock)
    told = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "expired" in str(c.args["text"])], timeout=30
    )
    assert told[0].args["text"].startswith(":unlock: The lock agent `captain` took on `deploy-api`")
    assert "<@agent:" not in str(slack.calls)
