"""Issue 7's fault suite: bot processes killed, webhooks lost, Redis restarted, Buildkite and
Slack rate limits, replays and bursts; every build's messages are counted in the fake Slack.

Each test prints its figures on a `[fault figures]` line: run with `-rA` (or `-s`) to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as redis

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import RedisServer
from app.simulators.slack import FakeSlack, RecordedCall
from app.storage.keys import EVENTS_GROUP, EVENTS_STREAM, PENDING_KEY, PREFIX
from app.storage.records import Transition
from app.tracking.notifier import Notifier
from app.tuning import DEFAULT
from tests.fault_harness import (
    FAULT_LOCK_TTL_MS,
    FINAL_STATES,
    SETTLE_S,
    Audit,
    BotProcess,
    BuildKey,
    Fleet,
    audit,
    figures,
    final_posted,
    last_final_at,
    send_changes,
    set_state,
    started_builds,
    threads,
)
from tests.waiting import wait_until

PIPELINES = [f"svc-{i:02d}" for i in range(10)]


@pytest.fixture
def fault_redis() -> Iterator[RedisServer]:
    """A Redis of the test's own that keeps an append-only file, as a deployment would."""
    server = RedisServer(persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
async def fleet(
    slack: FakeSlack, bk: FakeBuildkite, fault_redis: RedisServer, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """Bot processes (started by each test); all of them are stopped or killed at teardown."""
    bk.rate_limit = 1_000_000  # the storms are injected on purpose, not by the request count
    for slug in PIPELINES:
        bk.add_pipeline(slug)
    fleet = Fleet(slack, bk, fault_redis.url, tmp_path)
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
async def store_redis(fault_redis: RedisServer) -> AsyncIterator[redis.Redis]:
    client = redis.Redis.from_url(fault_redis.url)
    yield client
    await client.aclose()


def add_channels(slack: FakeSlack, count: int) -> list[str]:
    channels = [f"C0FLT{i:03d}" for i in range(count)]
    for number, channel in enumerate(channels):
        slack.add_channel(channel, f"fault-{number:03d}")
    return channels


async def deploy_all(
    fleet: Fleet, bots: list[BotProcess], count: int, channels: list[str]
) -> dict[str, list[BuildKey]]:
    """`count` /deploy commands spread over the bots, pipelines and channels; returns the
    builds each bot started, once every one of them has said so."""
    gate = asyncio.Semaphore(12)

    async def one(number: int) -> tuple[BotProcess, str]:
        bot = bots[number % len(bots)]
        async with gate:
            name = await fleet.deploy(
                bot, PIPELINES[number % len(PIPELINES)], channels[number % len(channels)]
            )
        return bot, name

    sent = await asyncio.gather(*(one(number) for number in range(count)))
    names = [name for _, name in sent]

    def all_started() -> dict[str, BuildKey] | None:
        found = started_builds(fleet.slack, names)
        return found if len(found) == count else None

    started = await wait_until(
        all_started, timeout=60, what=f"{count} builds started", describe=fleet.describe
    )
    assert started is not None
    by_bot: dict[str, list[BuildKey]] = {bot.name: [] for bot in bots}
    for bot, name in sent:
        by_bot[bot.name].append(started[name])
    return by_bot


async def settled(client: redis.Redis) -> bool:
    """No build left to follow and no transition left to write: nothing more can be posted."""
    return await client.zcard(PENDING_KEY) == 0 and await client.xlen(EVENTS_STREAM) == 0


async def wait_for_finals(
    slack: FakeSlack,
    bk: FakeBuildkite,
    client: redis.Redis,
    keys: list[BuildKey],
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Every build's final reply is out, then nothing is left that could post another one."""
    await wait_until(
        lambda: final_posted(slack, keys),
        timeout=SETTLE_S,
        what="a final message for every build",
        describe=lambda: f"{audit(slack, bk, keys).problems()}\n{describe()}",
    )
    await wait_until(lambda: settled(client), timeout=SETTLE_S, what="nothing left to write")


def unique_builds(bk: FakeBuildkite) -> bool:
    """Each build at Buildkite carries its own request id: no request started two."""
    ids = [build["meta_data"].get("chatops_request_id") for build in bk.builds]
    return None not in ids and len(set(ids)) == len(ids)


# -- three processes, one SIGKILLed, half the webhooks lost ----------------------------------


# Paths through Buildkite states, one per build, aligned so that every build ends in round 3.
PATHS = (
    (None, "running", "passed"),
    ("running", "failing", "failed"),
    ("running", "canceling", "canceled"),
    (None, None, "failed"),
)


async def consumer_of(client: redis.Redis, bot: BotProcess) -> dict[str, Any] | None:
    """The bot's consumer in the events group (its name carries the pid)."""
    for consumer in await client.xinfo_consumers(EVENTS_STREAM, EVENTS_GROUP):
        name = consumer["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        if f"-{bot.pid}-" in name:
            return {**consumer, "name": name}
    return None


async def unfinished(client: redis.Redis, consumer: str, bk: FakeBuildkite) -> dict[BuildKey, str]:
    """The builds whose transitions the consumer read and has not finished writing, with the
    state of the latest one."""
    by_id = {build["id"]: (build["pipeline"]["slug"], build["number"]) for build in bk.builds}
    entries = await client.xpending_range(
        EVENTS_STREAM, EVENTS_GROUP, min="-", max="+", count=10_000, consumername=consumer
    )
    found = {}
    for entry in entries:
        entry_id = entry["message_id"]
        read = await client.xrange(EVENTS_STREAM, entry_id, entry_id)
        for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], read):
            found[by_id[fields[b"build_id"].decode()]] = fields[b"to"].decode()
    return found


def duplicate_details(result: Audit, slack: FakeSlack, fleet: Fleet, killed_at: float) -> str:
    """Who sent each copy of a duplicated message, and when, relative to the SIGKILL."""
    found = threads(slack)
    lines = []
    for key in result.duplicate_roots + result.duplicate_finals:
        calls = found[key].roots if key in result.duplicate_roots else found[key].replies["final"]
        copies = ", ".join(
            f"{bot.name} at {call.time - killed_at:+.3f}s"
            for call in calls
            for bot in fleet.bots
            if bot.made(call)
        )
        lines.append(f"{key}: copies by {copies} from the kill")
    return "\n".join(lines)


async def test_three_bots_one_killed_and_half_the_webhooks_lost(
    fleet: Fleet, slack: FakeSlack, bk: FakeBuildkite, store_redis: redis.Redis
) -> None:
    began = time.monotonic()
    rng = random.Random(7)
    bots = await fleet.start(3)
    # 40 channels (5 builds each) over 10 pipelines: each bot posts at most once a second per
    # channel, so fewer channels would make this a test of Slack pacing.
    channels = add_channels(slack, 40)
    by_bot = await deploy_all(fleet, bots, 200, channels)
    deployed_at = time.monotonic()
    keys = sorted(key for started in by_bot.values() for key in started)
    plan = {key: rng.choice(PATHS) for key in keys}
    rounds = [[(key, step) for key in keys if (step := plan[key][r])] for r in range(3)]

    webhooks = await send_changes(fleet, rounds[0], rng=rng, deliver=0.5)
    for changes in (rounds[1], rounds[2][:100]):
        await asyncio.sleep(1.0)  # the builds run a while
        for name, count in (await send_changes(fleet, changes, rng=rng, deliver=0.5)).items():
            webhooks[name] += count

    # SIGKILL a bot while it holds final transitions it has read and not yet written.
    victim = bots[1]

    async def victim_holds_finals() -> dict[str, Any] | None:
        consumer = await consumer_of(store_redis, victim)
        if not consumer or not consumer["pending"]:
            return None
        held = await unfinished(store_redis, consumer["name"], bk)
        return consumer if set(held.values()) & set(FINAL_STATES) else None

    consumer = await wait_until(
        victim_holds_finals, timeout=30, what="the victim reads finals", describe=fleet.describe
    )
    victim.kill()
    killed_at = time.monotonic()
    # What it left unfinished stays with its consumer until another bot takes it over.
    stranded = await unfinished(store_redis, consumer["name"], bk)
    stranded_finals = {key for key, state in stranded.items() if state in FINAL_STATES}
    for name, count in (await send_changes(fleet, rounds[2][100:], rng=rng, deliver=0.5)).items():
        webhooks[name] += count

    async def taken_over() -> bool:
        dead = await consumer_of(store_redis, victim)
        return dead is None or dead["pending"] == 0

    await wait_until(taken_over, timeout=SETTLE_S, what="the dead bot's work taken over")
    takeover = time.monotonic() - killed_at
    await wait_for_finals(slack, bk, store_redis, keys, describe=fleet.describe)

    result = audit(slack, bk, keys)
    lookups = slack.calls_to("conversations.history") + slack.calls_to("conversations.replies")
    figures(
        "3 bots, 1 SIGKILLed, half the webhooks lost",
        {
            "builds": len(keys),
            "channels": len(channels),
            "pipelines": len(PIPELINES),
            "deploys_per_bot": "/".join(str(len(v)) for v in by_bot.values()),
            "builds_created": len(bk.builds),
            "roots": result.roots,
            "finals": result.finals,
            "duplicates": result.duplicates,
            "lookups_for_posts_maybe_made": len(lookups),
            "losses": result.losses,
            **{f"webhooks_{k}": v for k, v in webhooks.items()},
            "stranded_builds": len(stranded),
            "stranded_finals": len(stranded_finals),
            "takeover_s": takeover,
            "recovery_s": last_final_at(slack, stranded_finals) - killed_at,
            "deployed_by_killed_all_final_s": last_final_at(slack, by_bot[victim.name]) - killed_at,
            "all_final_after_kill_s": last_final_at(slack, keys) - killed_at,
            "deploys_s": deployed_at - began,
            "total_s": time.monotonic() - began,
            "lock_ttl_ms": FAULT_LOCK_TTL_MS,
        },
    )
    if result.duplicates:
        print(duplicate_details(result, slack, fleet, killed_at))
    assert len(bk.builds) == 200 and unique_builds(bk)
    problems = (
        f"{result.problems()}\n{duplicate_details(result, slack, fleet, killed_at)}\n"
        f"{fleet.describe()}"
    )
    assert result.losses == 0 and not result.wrong_thread, problems
    # Exactly once, including the posts a SIGKILL caught between Slack's answer and their
    # record in Redis: the bot that takes over finds them in Slack instead of posting again.
    assert result.duplicates == 0, problems
    assert not fleet.secrets_in_logs()


# -- Redis restarts ---------------------------------------------------------------------------


async def test_a_redis_restart_mid_run_loses_nothing_and_repeats_nothing(
    fleet: Fleet,
    slack: FakeSlack,
    bk: FakeBuildkite,
    fault_redis: RedisServer,
    store_redis: redis.Redis,
) -> None:
    began = time.monotonic()
    rng = random.Random(11)
    bots = await fleet.start(2)
    channels = add_channels(slack, 10)
    by_bot = await deploy_all(fleet, bots, 40, channels)
    keys = sorted(key for started in by_bot.values() for key in started)
    await send_changes(fleet, [(key, "running") for key in keys], rng=rng)
    rng.shuffle(keys)
    first, second = keys[:20], keys[20:]

    # Half the builds finish; Redis stops while their transitions are being written.
    await send_changes(fleet, [(key, rng.choice(("passed", "failed"))) for key in first], rng=rng)
    fault_redis.stop()
    stopped_at = time.monotonic()
    # The other half finish while Redis is down: their webhooks are refused (503).
    during = await send_changes(
        fleet, [(key, rng.choice(("passed", "canceled"))) for key in second], rng=rng
    )
    await asyncio.sleep(2.0)  # an outage of a few seconds
    fault_redis.start()  # same port, same append-only file
    outage = time.monotonic() - stopped_at
    still_followed = await store_redis.zcard(PENDING_KEY)

    await wait_for_finals(slack, bk, store_redis, sorted(keys), describe=fleet.describe)
    result = audit(slack, bk, keys)
    figures(
        "Redis restart mid-run",
        {
            "builds": len(keys),
            "roots": result.roots,
            "finals": result.finals,
            "duplicates": result.duplicates,
            "losses": result.losses,
            "webhooks_refused_while_down": during["refused"],
            "followed_after_restart": still_followed,
            "outage_s": outage,
            "all_final_after_restart_s": last_final_at(slack, keys) - stopped_at - outage,
            "total_s": time.monotonic() - began,
        },
    )
    assert during["refused"] > 0  # Redis really was down for them
    assert still_followed > 0  # and its data survived the restart
    assert not result.problems(), f"{result.problems()}\n{fleet.describe()}"
    assert (result.roots, result.finals) == (40, 40)
    assert len(bk.builds) == 40 and unique_builds(bk)
    assert not fleet.secrets_in_logs()


async def test_a_post_answered_while_redis_is_down_is_recorded_not_repeated(
    slack: FakeSlack, bk: FakeBuildkite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slack takes a build's message, then Redis goes away before the bot can note its ts: the
    bot notes it once Redis is back, keeping its build lock meanwhile and then releasing it,
    rather than leaving the transition to be written, and the message posted, again."""
    # Left-over transitions are taken over after 3 s (not while the first write is in flight),
    # locks renewed every 0.7 s (so during the outage), and a lock left behind lasts 20 s.
    tuning = replace(
        DEFAULT,
        tracking=replace(
            DEFAULT.tracking, reclaim_idle_ms=3000, lock_ttl_ms=20_000, lock_renew_ms=667
        ),
    )
    server = RedisServer(persistent=True)
    server.start()
    bk.add_pipeline("svc-00")
    try:
        async with running_bot(slack, bk, server.url, tuning=tuning, poll_interval=0.5) as bot:
            slack.latency = 1.0  # Slack keeps each message at once, and answers a second later
            assert (await bot.command("/deploy", "svc-00"))[0].status == 200
            await slack.wait_for(lambda: slack.messages.get("C0CHAN"))
            server.stop()
            await slack.wait_for(lambda: slack.posts("C0CHAN"))  # answered, unnoted
            await asyncio.sleep(0.5)
            server.start()
            slack.latency = 0.0
            bk.set_build_state("svc-00", 1, "passed")  # seen by a poll
            client = redis.Redis.from_url(server.url)
            try:
                await wait_until(
                    lambda: settled(client),
                    timeout=10,
                    what="all written soon after Redis is back",
                    describe=slack.describe,
                )

                async def unlocked() -> bool:
                    return not [key async for key in client.scan_iter(match=f"{PREFIX}lock:*")]

                # Well before a lock left behind would expire (20 s after its last renewal).
                await wait_until(unlocked, timeout=6, what="its build lock released")
            finally:
                await client.aclose()
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
    posts = slack.posts("C0CHAN")
    roots = [c for c in posts if not c.args.get("thread_ts")]
    assert len(roots) == 1, slack.describe()
    assert [c.args["thread_ts"] for c in posts[1:]] == [roots[0].response["ts"]]


async def end_renewals() -> None:
    """Cancel build-lock renewals until they end."""
    for _ in range(100):
        renewals = [
            t
            for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "").endswith(".renew")
        ]
        if not renewals:
            return
        for task in renewals:
            task.cancel()
        await asyncio.sleep(0.05)


async def test_a_lock_renewal_that_swallows_its_cancellation_does_not_hold_the_build(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py (8.1 on Python 3.11) can lose a cancellation that lands during a command: the
    command returns as if nothing happened. A lock renewal cancelled that way must still stop,
    or the write waits for it forever, its build lock renewed, and the build's next transitions
    are given up (the fault suite lost final messages so)."""
    # A renewal is nearly always in flight.
    tuning = replace(DEFAULT, tracking=replace(DEFAULT.tracking, lock_renew_ms=10))
    bk.add_pipeline("svc-00")
    losing = True
    try:
        async with running_bot(slack, bk, redis_url, tuning=tuning) as bot:
            store = bot.services.store
            renew_lock = store.renew_lock

            async def renewal_losing_its_cancellation(build_id: str, token: str) -> bool:
                if losing:  # the command in flight completes all the same, as redis-py's can
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.sleep(0.2)
                return await renew_lock(build_id, token)

            monkeypatch.setattr(store, "renew_lock", renewal_losing_its_cancellation)
            try:
                await bot.command("/deploy", "svc-00")
                root = await slack.wait_for(lambda: slack.posts("C0CHAN"))
                for state in ("running", "passed"):
                    bk.set_build_state("svc-00", 1, state)
                    assert (await bot.webhook(bk.webhook_payload("svc-00", 1))).status == 200
                ts = str(root[0].response["ts"])
                await slack.wait_for(
                    lambda: any("passed" in m["text"] for m in slack.thread("C0CHAN", ts)),
                    timeout=15,
                )
                await wait_until(lambda: settled(redis_client), timeout=15, what="all written")

                async def unlocked() -> bool:
                    return not [
                        key async for key in redis_client.scan_iter(match=f"{PREFIX}lock:*")
                    ]

                await wait_until(unlocked, timeout=15, what="every build lock released")
            finally:
                losing = False  # so that a broken bot can still be shut down
    finally:
        await end_renewals()  # a broken bot leaves some that its shutdown cannot end


async def test_a_builds_transitions_are_written_one_at_a_time_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The notifier writes builds in parallel but each build's transitions one after another: a
    third transition that comes while the second is written (the first done) waits for it too.
    (Each write also needs the build's Redis lock, which a second writer in the same process
    waits 5 s for, then leaves to be taken over a minute later.)"""
    notifier = Notifier(store=None, writer=None, tuning=DEFAULT.tracking)  # type: ignore[arg-type]
    done = {name: asyncio.Event() for name in ("first", "second", "third")}
    writing: list[str] = []
    overlaps: list[tuple[str, list[str]]] = []
    order: list[str] = []

    async def write(transition: Transition) -> None:
        if writing:
            overlaps.append((transition.entry_id, list(writing)))
        writing.append(transition.entry_id)
        await done[transition.entry_id].wait()
        writing.remove(transition.entry_id)
        order.append(transition.entry_id)

    monkeypatch.setattr(notifier, "_process_safely", write)

    def transition(name: str) -> Transition:
        return Transition(entry_id=name, build_id="b1", old="", new="running", gen=0)

    await notifier._start(transition("first"))
    await notifier._start(transition("second"))
    await asyncio.sleep(0.01)
    done["first"].set()
    await wait_until(lambda: writing == ["second"], timeout=30, what="the second written")
    await notifier._start(transition("third"))
    await asyncio.sleep(0.01)
    assert writing == ["second"], "the third is written beside the second"
    done["second"].set()
    done["third"].set()
    await notifier.finish_writing(2)
    assert order == ["first", "second", "third"] and not overlaps


# -- Buildkite rate limits and outages --------------------------------------------------------


async def test_buildkite_429_storms_and_5xx_bursts_start_each_build_once(
    fleet: Fleet, slack: FakeSlack, bk: FakeBuildkite, store_redis: redis.Redis
) -> None:
    began = time.monotonic()
    rng = random.Random(13)
    bots = await fleet.start(2)
    channels = add_channels(slack, 10)
    injected = {"429": 0, "5xx": 0, "lost_answers": 0}

    def storm(rate_limited: int, failures: int, method: str | None = None) -> None:
        # At most three 5xx per kind, so that no request meets more than its retries (three).
        bk.rate_limit_next(rate_limited, reset=1)
        bk.fail_next(failures, 502, method=method)
        injected["429"] += rate_limited
        injected["5xx"] += failures

    # While deploying: 429s, 5xx on creates (made all the same: a proxy's 502 after Buildkite took
    # it) and on reads, and creates whose answer is lost (the build exists, the bot does not know
    # it). A create that may have reached Buildkite is looked for, never sent again.
    bk.rate_limit_next(8, reset=1)
    injected["429"] += 8
    bk.fail_after_create_next(3, 502)
    bk.fail_next(3, 503, method="GET")
    injected["5xx"] += 6
    bk.drop_after_create_next(2)
    injected["lost_answers"] += 2
    by_bot = await deploy_all(fleet, bots, 20, channels)
    keys = sorted(key for started in by_bot.values() for key in started)

    # While the builds run and finish: storms on the polls; half the webhooks are lost.
    storm(6, 3)
    await send_changes(fleet, [(key, "running") for key in keys], rng=rng, deliver=0.5)
    await asyncio.sleep(1.0)
    storm(6, 3)
    finals = [(key, rng.choice(("passed", "failed"))) for key in keys]
    await send_changes(fleet, finals, rng=rng, deliver=0.5)
    await wait_for_finals(slack, bk, store_redis, keys, describe=fleet.describe)

    result = audit(slack, bk, keys)
    creates = bk.requests_to("POST", "/organizations/acme/pipelines/")
    figures(
        "Buildkite 429 storms and 5xx bursts",
        {
            "deploys": 20,
            "builds_created": len(bk.builds),
            "create_requests": len(creates),
            **{f"injected_{k}": v for k, v in injected.items()},
            "faults_left": bk.faults_left("rate_limit") + bk.faults_left("fail"),
            "roots": result.roots,
            "finals": result.finals,
            "duplicates": result.duplicates,
            "losses": result.losses,
            "total_s": time.monotonic() - began,
        },
    )
    # Every storm was met (and waited out or retried) by a bot.
    assert bk.faults_left("rate_limit") == bk.faults_left("fail") == bk.faults_left("drop") == 0
    assert len(bk.builds) == 20 and unique_builds(bk)
    # Only a create answered 429 (Buildkite did nothing) was sent again.
    assert 20 <= len(creates) <= 20 + 8
    assert not result.problems(), f"{result.problems()}\n{fleet.describe()}"
    assert (result.roots, result.finals) == (20, 20)
    assert not fleet.secrets_in_logs()


# -- a slow Buildkite: one build per command --------------------------------------------------

#: The bots' Buildkite timeout and how long they look for a create left unanswered, and when
#: Buildkite answers it: production's 15 s, 60 s and an answer 20 s in, scaled down so that
#: the answer still comes after the timeout and between two of the bot's looks (at 3 s, 5 s).
BOT_TIMEOUT_S = 2
LATE_ANSWER_S = 3.5
LATE_ANSWERS = {"BUILDKITE_TIMEOUT": str(BOT_TIMEOUT_S), "BUILDKITE_START_PATIENCE": "6"}


def posts_about(slack: FakeSlack, key: BuildKey) -> tuple[list[RecordedCall], list[RecordedCall]]:
    """A build's own messages (in the channel or in a thread) and its final replies."""
    pipeline, number = key
    own = [
        c for c in slack.posts() if str(c.args.get("text", "")).startswith(f"{pipeline} #{number}:")
    ]
    found = threads(slack).get(key)
    return own, list(found.replies.get("final", [])) if found else []


async def test_a_create_answered_after_the_timeout_starts_one_build_followed_to_its_end(
    fleet: Fleet, slack: FakeSlack, bk: FakeBuildkite, store_redis: redis.Redis
) -> None:
    """Buildkite makes the build as it answers, after the bot's timeout: the bot's looks find
    it (the first misses it) and it is followed, never created a second time. Production's 15 s
    timeout, an answer 20 s in and 60 s of looking, scaled down to 2 s, 3.5 s and 6 s."""
    began = time.monotonic()
    rng = random.Random(19)
    bots = await fleet.start(2, env=LATE_ANSWERS)
    (channel,) = add_channels(slack, 1)
    bk.answer_late_next(LATE_ANSWER_S, "/builds", method="POST")
    name = await fleet.deploy(bots[0], PIPELINES[0], channel)
    started = await wait_until(
        lambda: started_builds(slack, [name]), timeout=90, what="the build", describe=fleet.describe
    )
    answered_s = time.monotonic() - began
    key = started[name]
    for state in ("running", "passed"):
        await send_changes(fleet, [(key, state)], rng=rng)
    await wait_for_finals(slack, bk, store_redis, [key], describe=fleet.describe)

    result = audit(slack, bk, [key])
    creates = bk.requests_to("POST", "/organizations/acme/pipelines/")
    figures(
        f"create answered after {LATE_ANSWER_S} s (timeout {BOT_TIMEOUT_S} s)",
        {
            "builds_created": len(bk.builds),
            "create_requests": len(creates),
            "roots": result.roots,
            "finals": result.finals,
            "answers": len([p for p in slack.responses if p.name == name]),
            "build_found_after_s": answered_s,
        },
    )
    assert len(bk.builds) == 1 and len(creates) == 1
    assert not result.problems(), f"{result.problems()}\n{fleet.describe()}"
    assert (result.roots, result.finals) == (1, 1)
    assert not fleet.secrets_in_logs()


async def test_a_create_seen_only_after_the_bots_patience_is_adopted_once(
    fleet: Fleet, slack: FakeSlack, bk: FakeBuildkite, store_redis: redis.Redis
) -> None:
    """Buildkite makes the build 6 s in, after the bot (2 s timeout, 1 s of looking) has told
    the person it may have started: one of the two bots' pollers adopts it, once. (Production's
    15 s timeout, 5 s of looking and a build made 30 s in, scaled down.)"""
    began = time.monotonic()
    rng = random.Random(23)
    bots = await fleet.start(2, env={**LATE_ANSWERS, "BUILDKITE_START_PATIENCE": "1"})
    (channel,) = add_channels(slack, 1)
    bk.answer_late_next(6.0, "/builds", method="POST")
    name = await fleet.deploy(bots[0], PIPELINES[0], channel)
    await wait_until(
        lambda: any(
            "may have started" in str(p.json.get("text")) for p in slack.responses if p.name == name
        ),
        timeout=60,
        what="a 'may have started' answer",
        describe=fleet.describe,
    )
    told_s = time.monotonic() - began
    await wait_until(lambda: bk.builds, timeout=30, what="the late build")
    appeared_s = time.monotonic() - began
    key = (PIPELINES[0], 1)
    await wait_until(
        lambda: threads(slack)[key].roots, timeout=30, what="its message", describe=fleet.describe
    )
    adopted_s = time.monotonic() - began
    for state in ("running", "passed"):
        await send_changes(fleet, [(key, state)], rng=rng)
    await wait_for_finals(slack, bk, store_redis, [key], describe=fleet.describe)

    result = audit(slack, bk, [key])
    adopters = [bot.name for bot in bots if any("adopted" in m for m in bot.log_messages())]
    figures(
        f"create seen after the bot's patience ({BOT_TIMEOUT_S} s + 1 s), made 6 s in",
        {
            "builds_created": len(bk.builds),
            "create_requests": len(bk.requests_to("POST", "/organizations/acme/pipelines/")),
            "roots": result.roots,
            "finals": result.finals,
            "adopted_by": "/".join(adopters),
            "told_maybe_started_s": told_s,
            "time_to_adoption_s": adopted_s - appeared_s,
        },
    )
    assert len(bk.builds) == 1
    assert len(bk.requests_to("POST", "/organizations/acme/pipelines/")) == 1
    assert not result.problems(), f"{result.problems()}\n{fleet.describe()}"
    assert (result.roots, result.finals) == (1, 1) and len(adopters) == 1
    assert [p.name for p in slack.responses if "Started" in str(p.json.get("text"))] == []
    assert not fleet.secrets_in_logs()


async def test_a_rebuild_answered_after_the_timeout_starts_one_rebuild(
    fleet: Fleet, slack: FakeSlack, bk: FakeBuildkite, store_redis: redis.Redis
) -> None:
    """As the late create above, for a rebuild: found by the bot's looks, never sent twice."""
    began = time.monotonic()
    rng = random.Random(29)
    bots = await fleet.start(2, env=LATE_ANSWERS)
    (channel,) = add_channels(slack, 1)
    name = await fleet.deploy(bots[0], PIPELINES[0], channel)
    first = (await wait_until(lambda: started_builds(slack, [name]), timeout=30, what="#1"))[name]
    await send_changes(fleet, [(first, "failed")], rng=rng)
    await wait_for_finals(slack, bk, store_redis, [first], describe=fleet.describe)

    bk.answer_late_next(LATE_ANSWER_S, "/rebuild", method="PUT")
    sent = time.monotonic()
    rebuild, (status, _) = await fleet.command(bots[1], "/rebuild", f"{first[0]} 1", channel)
    assert status == 200
    await wait_until(
        lambda: any(
            "Started" in str(p.json.get("text")) for p in slack.responses if p.name == rebuild
        ),
        timeout=90,
        what="the rebuild started",
        describe=fleet.describe,
    )
    answered_s = time.monotonic() - sent
    second = (first[0], 2)
    await send_changes(fleet, [(second, "passed")], rng=rng)
    await wait_until(
        lambda: posts_about(slack, second)[1], timeout=SETTLE_S, what="#2's final reply"
    )
    await wait_until(lambda: settled(store_redis), timeout=SETTLE_S, what="nothing left to write")

    own, finals = posts_about(slack, second)
    rebuilds = [r for r in bk.requests if r.method == "PUT" and r.path.endswith("/rebuild")]
    figures(
        f"rebuild answered after {LATE_ANSWER_S} s (timeout {BOT_TIMEOUT_S} s)",
        {
            "builds_created": len(bk.builds),
            "rebuild_requests": len(rebuilds),
            "rebuild_messages": len(own),
            "rebuild_finals": len(finals),
            "build_found_after_s": answered_s,
            "total_s": time.monotonic() - began,
        },
    )
    assert len(bk.builds) == 2 and len(rebuilds) == 1
    assert bk.builds[1]["rebuilt_from"]["number"] == 1
    assert (len(own), len(finals)) == (1, 1)
    assert not fleet.secrets_in_logs()


# -- replays ----------------------------------------------------------------------------------


async def test_replayed_requests_act_once_then_are_refused(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: redis.Redis
) -> None:
    bk.add_pipeline("svc-00")
    async with running_bot(slack, bk, redis_url) as bot:
        name, url = bot.new_response_url()
        trigger = slack_requests.new_trigger_id()
        body, headers = slack_requests.slash_command(
            "/deploy", "svc-00", response_url=url, signing_secret=SIGNING_SECRET, trigger_id=trigger
        )
        # The same signed /deploy twice (Slack retries, or someone replays it at once).
        assert (await bot.post_slack(body, headers)).status == 200
        assert (await bot.post_slack(body, headers)).status == 200
        await slack.wait_for(lambda: len(bot.response_texts(name)) == 2)
        texts = bot.response_texts(name)
        assert sum("Started" in t for t in texts) == 1
        assert sum("You already asked for this" in t for t in texts) == 1
        # The same body six minutes later: its signed timestamp is too old.
        stale = slack_requests.signed_headers(
            body,
            signing_secret=SIGNING_SECRET,
            content_type=slack_requests.FORM,
            timestamp=int(time.time()) - 360,
        )
        assert (await bot.post_slack(body, stale)).status == 401

        root = await slack.wait_for(lambda: slack.posts("C0CHAN"))
        bk.set_build_state("svc-00", 1, "passed")
        payload = bk.webhook_payload("svc-00", 1)
        now = int(time.time())
        for _ in range(2):  # the same signed webhook twice
            assert (await bot.webhook(payload, signed=True, timestamp=now)).status == 200
        assert (await bot.webhook(payload, signed=True, timestamp=now - 360)).status == 401
        # A token-mode webhook carries no time, so its replay is accepted, and changes nothing.
        assert (await bot.webhook(payload)).status == 200
        ts = str(root[0].response["ts"])
        await slack.wait_for(lambda: slack.thread("C0CHAN", ts))
        await wait_until(lambda: settled(redis_client), timeout=10, what="nothing left to write")

    posts = slack.posts("C0CHAN")
    figures(
        "replays",
        {
            "deploys_sent": 3,
            "builds_created": len(bk.builds),
            "webhooks_sent": 4,
            "root_messages": sum(not c.args.get("thread_ts") for c in posts),
            "thread_replies": sum(bool(c.args.get("thread_ts")) for c in posts),
        },
    )
    assert len(bk.builds) == 1
    assert len(bk.requests_to("POST", "/organizations/acme/pipelines/svc-00/builds")) == 1
    assert [c.args.get("thread_ts") for c in posts] == [None, ts]  # one root, one final reply
    assert "passed" in str(posts[1].args["text"])


# -- a burst of changes under Slack rate limits -----------------------------------------------


BURST_PATHS = (
    ("running", "failing", "canceling", "canceled"),
    ("running", "blocked", "running", "passed"),
    ("running", "blocked", "running", "failed"),
)


def retried(calls: list[RecordedCall], limited: RecordedCall) -> bool:
    """A later successful call of the same method for the same message (or channel and text)."""
    same = ("channel", "ts") if limited.method == "chat.update" else ("channel", "text")
    return any(
        c.ok
        and c.time >= limited.time
        and c.method == limited.method
        and all(c.args.get(k) == limited.args.get(k) for k in same)
        for c in calls
    )


async def test_a_burst_of_changes_under_slack_429s_ends_with_every_message_true(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    began = time.monotonic()
    rng = random.Random(17)
    bk.rate_limit = 1_000_000
    for slug in PIPELINES:
        bk.add_pipeline(slug)
    channels = add_channels(slack, 25)
    async with running_bot(slack, bk, redis_url, poll_interval=1.0) as bot:
        names = []
        for number in range(50):
            resp, name, _ = await bot.command(
                "/deploy",
                PIPELINES[number % len(PIPELINES)],
                channel_id=channels[number % len(channels)],
            )
            assert resp.status == 200
            names.append(name)
        started = await wait_until(
            lambda: (found := started_builds(slack, names)) and len(found) == 50 and found,
            timeout=30,
            what="50 builds started",
        )
        assert started
        keys = sorted(started.values())
        await wait_until(
            lambda: all(threads(slack)[key].roots for key in keys), timeout=30, what="50 roots"
        )

        # 200 changes, each build's four in order, the builds interleaved; Slack answers some
        # edits and posts with 429 and Retry-After.
        injected = 0
        plan = {key: rng.choice(BURST_PATHS) for key in keys}
        for step in range(4):
            if step in (0, 2):  # slack_sdk waits Retry-After plus up to a second for each
                slack.fail_next("chat.update", retry_after=1)
                slack.fail_next("chat.postMessage", retry_after=1)
                injected += 2
            order = list(keys)
            rng.shuffle(order)

            async def change(key: BuildKey, state: str) -> None:
                set_state(bk, key, state)
                assert (await bot.webhook(bk.webhook_payload(*key))).status == 200

            await asyncio.gather(*(change(key, plan[key][step]) for key in order))
        burst_s = time.monotonic() - began
        await wait_for_finals(slack, bk, redis_client, keys)

    result = audit(slack, bk, keys)
    limited = [c for c in slack.calls if c.status == 429]
    unhandled = [c for c in limited if not retried(slack.calls, c)]
    write_failures = [r for r in caplog.records if "slack write failed" in r.getMessage()]
    figures(
        "burst of 200 changes across 50 builds",
        {
            "builds": len(keys),
            "changes": 200,
            "roots": result.roots,
            "finals": result.finals,
            "duplicates": result.duplicates,
            "wrong_final_state": len(result.wrong_state),
            "slack_429s_injected": injected,
            "slack_429s_answered": len(limited),
            "slack_429s_retried": len(limited) - len(unhandled),
            "edits": len(slack.updates()),
            "until_burst_sent_s": burst_s,
            "total_s": time.monotonic() - began,
        },
    )
    assert len(limited) == injected and not unhandled
    assert not [r for r in write_failures if r.levelno >= logging.WARNING]
    assert not result.problems(), result.problems()
    assert (result.roots, result.finals) == (50, 50)
