"""A build's message and each thread reply reach Slack once, even when Slack's answer to the
post is lost or the process dies between Slack's answer and its record in Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack import outbox as outbox_module
from app.storage import keys
from app.storage.store import Store
from app.tuning import DEFAULT
from tests.waiting import wait_until

CHANNEL = "C0CHAN"
#: A post made is retried to be recorded for 50 ms only; a transition left unfinished is taken
#: over after 300 ms (as another process would, after a crash).
QUICK_TAKEOVER = replace(
    DEFAULT, tracking=replace(DEFAULT.tracking, record_patience=0.05, reclaim_idle_ms=300)
)


@pytest.fixture
async def quick_bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str
) -> AsyncIterator[BotClient]:
    """The `bot` fixture's bot, giving up a record and taking over its transitions quickly."""
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url, tuning=QUICK_TAKEOVER) as client:
        yield client


def roots(slack: FakeSlack) -> list[dict[str, Any]]:
    """Top-level messages in the channel, as Slack holds them (not as the bot believes)."""
    return [
        m for m in slack.history(CHANNEL) if not m.get("thread_ts") or m["thread_ts"] == m["ts"]
    ]


def finals(slack: FakeSlack, thread_ts: str) -> list[dict[str, Any]]:
    return [m for m in slack.thread(CHANNEL, thread_ts) if "passed" in m["text"]]


async def send_state(bot: BotClient, state: str) -> None:
    bot.bk.set_build_state("deploy-prod", 1, state)
    assert (await bot.webhook(bot.bk.webhook_payload("deploy-prod", 1))).status == 200


async def attempts_left(redis_client: Any) -> list[bytes]:
    """Post attempts not yet forgotten, once the bot had time to finish its writes (at once
    when none is left; a deadline of 30 s for a loaded machine)."""
    deadline = time.monotonic() + 30
    while True:
        left = [k async for k in redis_client.scan_iter(match=keys.PREFIX + "post:*")]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


async def test_a_post_whose_answer_is_lost_is_found_not_sent_again(
    bot: BotClient, slack: FakeSlack, redis_client: Any
) -> None:
    slack.drop_answer_next("chat.postMessage")
    _, _, ack = await bot.command("/deploy", "deploy-prod")
    assert "Starting a build" in ack["text"]
    lookups = await slack.wait_for(lambda: slack.calls_to("conversations.history"))
    assert lookups[0].args["include_all_metadata"] is True
    # One message in Slack, carrying the key the look-up found it by; the bot kept its ts.
    [root] = roots(slack)
    assert root["metadata"]["event_type"] == outbox_module.POST_EVENT_TYPE
    assert slack.calls_to("chat.postMessage")[0].answer_lost
    await send_state(bot, "passed")
    await slack.wait_for(lambda: finals(slack, root["ts"]))
    assert len(roots(slack)) == 1
    assert "Passed" in json.dumps(slack.message(CHANNEL, root["ts"])["blocks"])
    assert await attempts_left(redis_client) == []


async def test_a_reply_made_but_not_recorded_is_not_repeated(
    quick_bot: BotClient,
    slack: FakeSlack,
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slack took the final reply, then Redis failed the record: the transition is tried again
    (as another process would after a crash) and finds the reply instead of posting it twice."""
    _, _, _ = await quick_bot.command("/deploy", "deploy-prod")
    root = await slack.wait_for(lambda: roots(slack)[0] if roots(slack) else None)
    assert root is not None
    failures = [1, 1]  # the first try and its retry within record_patience
    real_mark = Store.mark_posted

    async def mark_posted_once_failing(self: Store, *args: Any) -> None:
        if failures:
            failures.pop()
            raise ConnectionError("Redis went away")
        await real_mark(self, *args)

    monkeypatch.setattr(Store, "mark_posted", mark_posted_once_failing)
    await send_state(quick_bot, "passed")
    lookup = await slack.wait_for(lambda: slack.calls_to("conversations.replies"), timeout=10)
    assert lookup[0].args["ts"] == root["ts"]
    store = Store(redis_client)
    [build_id] = [b["id"] for b in quick_bot.bk.builds if b["number"] == 1]
    await slack.wait_for(lambda: not failures, timeout=10)

    async def recorded() -> bool:
        return await store.was_posted(build_id, CHANNEL, 0, "final")

    await wait_until(recorded, timeout=30, what="the final reply recorded")
    assert len(finals(slack, root["ts"])) == 1
    assert len([c for c in slack.posts(CHANNEL) if c.args.get("thread_ts")]) == 1
    assert await attempts_left(redis_client) == []


async def test_without_the_history_scope_the_post_is_made_and_the_fix_logged(
    bot: BotClient, slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    slack.drop_answer_next("chat.postMessage")
    slack.fail_next("conversations.history", error="missing_scope", n=5)
    await bot.command("/deploy", "deploy-prod")
    await slack.wait_for(lambda: len(roots(slack)) == 2, timeout=10)  # shown twice, never lost
    logged = [r.getMessage() for r in caplog.records if "may have been made" in r.getMessage()]
    assert len(logged) == 1
    assert "channels:history" in logged[0] and CHANNEL in logged[0]


async def test_a_5xx_on_a_post_is_checked_then_retried_once(
    bot: BotClient, slack: FakeSlack, redis_client: Any
) -> None:
    slack.fail_next("chat.postMessage", error="internal_error", status=500)
    await bot.command("/deploy", "deploy-prod")
    await slack.wait_for(lambda: roots(slack))
    assert len(slack.calls_to("conversations.history")) == 1  # looked first: it was not there
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [500, 200]
    assert len(roots(slack)) == 1


def test_which_failures_leave_a_post_in_doubt() -> None:
    doubt = [
        outbox_module.SlackDeliveryError("chat.postMessage", CHANNEL, error)
        for error in ("http_503", "connection_error", "internal_error")
    ]
    assert all(e.unknown_outcome and not e.permanent for e in doubt)
    refused = outbox_module.SlackDeliveryError("chat.postMessage", CHANNEL, "ratelimited")
    assert not refused.unknown_outcome and not refused.permanent
    wrong = outbox_module.SlackDeliveryError("chat.postMessage", CHANNEL, "not_in_channel")
    assert wrong.permanent and not wrong.unknown_outcome


async def test_a_message_found_after_a_crash_is_brought_up_to_date(
    quick_bot: BotClient, slack: FakeSlack, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build message was posted (showing Scheduled) but its ts never recorded; by the time
    it is found the build has passed: the message found is edited to show Passed."""
    failures = [1, 1]
    real_save = Store.save_target

    async def save_target_failing_first(self: Store, *args: Any) -> None:
        if failures:
            failures.pop()
            raise ConnectionError("Redis went away")
        await real_save(self, *args)

    monkeypatch.setattr(Store, "save_target", save_target_failing_first)
    await quick_bot.command("/deploy", "deploy-prod")
    await slack.wait_for(lambda: not failures and roots(slack))
    assert "Scheduled" in json.dumps(roots(slack)[0]["blocks"])
    await send_state(quick_bot, "passed")
    await slack.wait_for(lambda: slack.calls_to("conversations.history"), timeout=10)
    [root] = roots(slack)
    await slack.wait_for(
        lambda: "Passed" in json.dumps(slack.message(CHANNEL, root["ts"])["blocks"])
    )
    await slack.wait_for(lambda: finals(slack, root["ts"]))
    assert len(roots(slack)) == 1


async def test_a_post_refused_for_good_leaves_no_attempt_behind(
    bot: BotClient, slack: FakeSlack, redis_client: Any
) -> None:
    slack.fail_next("chat.postMessage", error="not_in_channel")
    _, name, _ = await bot.command("/deploy", "deploy-prod")
    await slack.wait_for(lambda: [t for t in bot.response_texts(name) if "cannot post" in t])
    assert await attempts_left(redis_client) == []  # no look-up is owed for a post never made
