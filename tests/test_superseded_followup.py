"""The stale-block guard's follow-up survives its process: a bot that dies between marking a
blocked build superseded and cancelling it leaves the cancel to the sweep, which sends it once,
and never twice when the first cancel had gone out. Also: a branch with slashes and unicode, and
an older build's webhook that arrives after the newer build passed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.core.supersede import StaleBlocks
from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from app.storage.records import SupersededBy
from tests.test_superseded import BUILDS, CHANNEL, deploy, move

#: The bot's own sweep looks at start-up only: the test drives it.
TUNING = dataclasses.replace(
    FAST, sweeps=dataclasses.replace(FAST.sweeps, superseded_interval=3600)
)


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    path = tmp_path / "policy.yml"
    path.write_text("pipelines:\n  deploy-prod:\n    superseded: cancel\n")
    bk.add_pipeline("deploy-prod", block="Release", steps=("Test", "Deploy"))
    async with running_bot(slack, bk, redis_url, tuning=TUNING, policy_file=str(path)) as client:
        yield client


def guard(bot: BotClient) -> StaleBlocks:
    s = bot.services
    return StaleBlocks(
        s.policy, s.store, s.buildkite, s.outbox, s.auditor, observe=s.tracker.observe, lease=60
    )


async def died_after_marking(bot: BotClient, number: int) -> str:
    """What a bot that died right after its mark leaves: the mark, its follow-up due."""
    tracked = await bot.services.store.find("deploy-prod", number)
    assert tracked is not None
    by = SupersededBy(number=number + 1, url="https://buildkite.com/x", mode="cancel")
    assert await bot.services.store.supersede(tracked.build_id, by, lease_until=time.time() - 1)
    return tracked.build_id


def created(bk: FakeBuildkite, n: int) -> Callable[[], bool]:
    return lambda: len(bk.requests_to("POST", BUILDS)) == n


async def guard_entries(redis_client: Any) -> list[dict[str, str]]:
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]
    return [e for e in entries if e["user"] == "stale-block guard"]


async def test_a_cancel_lost_with_its_process_is_sent_by_the_sweep_once(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    first = await deploy(bot)
    await move([bot], 1, "running", blocked=True)
    await died_after_marking(bot, 1)
    one, two = guard(bot), guard(bot)  # two replicas sweep at once
    assert sorted([await one.resume(), await two.resume()]) == [0, 1]
    await bot.settled()
    assert len(bk.requests_to("PUT", BUILDS + "/1/cancel")) == 1
    assert await one.resume() == 0
    assert len(bk.requests_to("PUT", BUILDS + "/1/cancel")) == 1
    replies = [c.args["text"] for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == first]
    assert len([t for t in replies if "Canceled by the bot" in t]) == 1
    assert [e["build"] for e in await guard_entries(redis_client)] == ["1"]
    assert await redis_client.zcard(keys.SUPERSEDED_FOLLOWUP_KEY) == 0


async def test_a_cancel_sent_before_its_process_died_is_not_sent_again(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await deploy(bot)
    await move([bot], 1, "running", blocked=True)
    await died_after_marking(bot, 1)
    bk.set_build_state("deploy-prod", 1, "canceled")  # its cancel had gone out
    assert await guard(bot).resume() == 1
    await bot.settled()
    assert bk.requests_to("PUT", BUILDS + "/1/cancel") == []


async def test_a_mark_followed_up_at_once_leaves_nothing_to_the_sweep(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    await deploy(bot)
    await move([bot], 1, "running", blocked=True)
    await deploy(bot)
    await move([bot], 2, "passed")
    assert len(bk.requests_to("PUT", BUILDS + "/1/cancel")) == 1
    assert await redis_client.zcard(keys.SUPERSEDED_FOLLOWUP_KEY) == 0
    assert await guard(bot).resume() == 0


@pytest.mark.parametrize("branch", ["release/2026.12/ünïcode-ß", "feat/deep/x-y_z.1"])
async def test_an_older_blocks_webhook_after_the_newer_passed_is_superseded_on_its_branch(
    bot: BotClient, bk: FakeBuildkite, branch: str
) -> None:
    """#2 passes before #1's block is heard of (webhooks out of order), on a branch with
    slashes and unicode: #1 is still superseded, and only #1 is cancelled; a build
    of another branch is not touched."""
    for n, which in enumerate([branch, branch, "main"], start=1):
        await bot.command("/deploy", f"deploy-prod {which}")
        await bot.slack.wait_for(created(bk, n))
    await move([bot], 3, "running", blocked=True)  # main
    await move([bot], 2, "passed")
    await move([bot], 1, "running", blocked=True)
    assert len(bk.requests_to("PUT", BUILDS + "/1/cancel")) == 1
    assert bk.requests_to("PUT", BUILDS + "/2/cancel") == []
    assert bk.requests_to("PUT", BUILDS + "/3/cancel") == []
    # Delivered again, later: nothing more.
    await move([bot], 1, "running", blocked=True)
    assert len(bk.requests_to("PUT", BUILDS + "/1/cancel")) == 1
