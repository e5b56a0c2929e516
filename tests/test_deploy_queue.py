"""A burst of /deploy: each is acknowledged at once; a few run at a time, the next wait their turn
in order, and any more are refused in their ack. Nobody is left without an answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

import pytest

from app.core.deploy_queue import DeployQueue
from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.tuning import Tuning

PIPELINES = [f"svc-{n}" for n in range(6)]


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> AsyncIterator[BotClient]:
    for slug in PIPELINES:
        bk.add_pipeline(slug)
    async with running_bot(slack, bk, redis_url, tuning=queue_of(1, 2)) as client:
        yield client


def queue_of(running: int, waiting: int, *, grace: float | None = None) -> Tuning:
    """The test bot's tuning with a small deploy queue (and a shutdown grace of its own)."""
    tuning = replace(FAST, deploys=replace(FAST.deploys, running=running, waiting=waiting))
    return tuning if grace is None else replace(tuning, shutdown_grace=grace)


def created(bk: FakeBuildkite) -> list[str]:
    """Pipelines of the builds created, in the order Buildkite received them."""
    return [r.path.split("/")[-2] for r in bk.requests if r.method == "POST"]


async def test_a_burst_of_deploys_runs_one_at_a_time_in_order_and_refuses_the_rest(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.latency = 0.1  # so the first deploy is still running when the others arrive
    acks, names = [], []
    for slug in PIPELINES:
        resp, name, ack = await bot.command("/deploy", slug)
        assert resp.status == 200
        acks.append(ack["text"])
        names.append(name)

    assert "Starting a build of `svc-0`" in acks[0]
    assert "`svc-1` is number 1 in line" in acks[1]
    assert "`svc-2` is number 2 in line" in acks[2]
    for text, slug in zip(acks[3:], PIPELINES[3:], strict=True):
        assert f"Too many deploys are starting right now, so `{slug}` was not deployed" in text

    # Every admitted deploy is started and answered, first come first served.
    for name in names[:3]:
        await slack.wait_for(partial(bot.response_texts, name))
    assert created(bk) == PIPELINES[:3]
    for name, slug in zip(names[:3], PIPELINES[:3], strict=True):
        (text,) = bot.response_texts(name)
        assert f"Started <https://buildkite.com/acme/{slug}/builds/1|{slug} #1>" in text
    # A refused deploy was told so in its ack, and nothing else happened for it.
    assert all(not bot.response_texts(name) for name in names[3:])
    # One deploy at a time: never two of its Buildkite calls at once.
    assert bk.most_in_flight == 1

    # Places free up once deploys are done: the next one starts at once.
    resp, name, ack = await bot.command("/deploy", "svc-4")
    assert "Starting a build of `svc-4`" in ack["text"]
    await slack.wait_for(lambda: bot.response_texts(name))
    assert created(bk) == [*PIPELINES[:3], "svc-4"]


async def test_a_deploy_that_fails_still_frees_its_place(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    for _ in range(5):
        _, name, ack = await bot.command("/deploy", "no-such-pipeline")
        assert "Starting a build" in ack["text"]
        (text,) = await slack.wait_for(partial(bot.response_texts, name))
        assert "was not found" in text
    _, name, ack = await bot.command("/deploy", "svc-0")
    assert "Starting a build of `svc-0`" in ack["text"]
    await slack.wait_for(lambda: bot.response_texts(name))
    assert created(bk) == ["svc-0"]


async def test_a_deploy_still_waiting_at_shutdown_is_told_it_was_not_started(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
) -> None:
    for slug in PIPELINES[:2]:
        bk.add_pipeline(slug)
    async with running_bot(slack, bk, redis_url, tuning=queue_of(1, 1, grace=0.5)) as bot:
        bk.delay_next(1, 5.0, "/builds", method="POST")  # the first deploy outlives the grace
        await bot.command("/deploy", "svc-0")
        _, second, ack = await bot.command("/deploy", "svc-1")
        assert "`svc-1` is number 1 in line" in ack["text"]
        await slack.wait_for(lambda: any(r.method == "POST" for r in bk.requests))
    (text,) = await slack.wait_for(lambda: bot.response_texts(second))
    assert "restarted before your deploy of `svc-1` could start, so nothing was started" in text
    assert [r.path for r in bk.requests if "svc-1" in r.path] == []


def test_the_queue_needs_room_to_run_one_deploy() -> None:
    with pytest.raises(ValueError, match="running"):
        DeployQueue(running=0, waiting=5)


async def test_a_waiting_deploy_does_not_start_during_the_shutdown(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
) -> None:
    """The running deploy finishes within the shutdown's grace; the one waiting behind it is
    told at once that it was not started, instead of starting while the bot stops."""
    for slug in PIPELINES[:2]:
        bk.add_pipeline(slug)
    async with running_bot(slack, bk, redis_url, tuning=queue_of(1, 1, grace=5.0)) as bot:
        bk.delay_next(1, 1.0, "/builds", method="POST")  # done well within the grace
        _, first, _ = await bot.command("/deploy", "svc-0")
        _, second, ack = await bot.command("/deploy", "svc-1")
        assert "`svc-1` is number 1 in line" in ack["text"]
        await slack.wait_for(lambda: any(r.method == "POST" for r in bk.requests))
    (text,) = await slack.wait_for(lambda: bot.response_texts(second))
    assert "nothing was started" in text
    assert created(bk) == ["svc-0"]
    (started,) = await slack.wait_for(lambda: bot.response_texts(first))
    assert "Started" in started  # the running one was let finish and answered
