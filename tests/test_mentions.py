"""`@bot <command>` in a build's thread, end to end: signed app_mention events in, what reached
Slack and Buildkite out, with the same policy and de-duplication as the build's buttons."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

CHANNEL, ALICE, BOB = "C0CHAN", "U0USER", "U0BOB"
BUILD = "/organizations/acme/pipelines/{}/builds/{}"
POLICY = """\
default:
  deployers: [U0USER, U0BOB]
pipelines:
  locked-down:
    deployers: [U0USER]
"""


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    bk.add_pipeline("web", steps=("Test", "Deploy"))
    bk.add_pipeline("gated", block="Release", steps=("Test",))
    bk.add_pipeline(
        "forms",
        block="Approve",
        block_fields=[{"text": "Notes", "key": "notes", "required": True}],
    )
    bk.add_pipeline("locked-down")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as client:
        yield client


def roots(slack: FakeSlack) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if not c.args.get("thread_ts")]


def thread_posts(slack: FakeSlack, ts: str) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == ts]


async def deploy(bot: BotClient, pipeline: str, user: str = ALICE) -> str:
    before = len(roots(bot.slack))
    await bot.command("/deploy", pipeline, user_id=user)
    posts = await bot.slack.wait_for(lambda: len(roots(bot.slack)) > before and roots(bot.slack))
    assert posts
    await bot.settled()
    return str(posts[-1].response["ts"])


async def move(bot: BotClient, slug: str, state: str, number: int = 1, **kwargs: Any) -> None:
    bot.bk.set_build_state(slug, number, state, **kwargs)
    assert (await bot.webhook(bot.bk.webhook_payload(slug, number))).status == 200
    await bot.settled()


async def mention(
    bot: BotClient,
    text: str,
    *,
    thread_ts: str | None,
    user: str = ALICE,
    event_id: str | None = None,
    retry_num: int | None = None,
) -> str:
    """Deliver `@bot text` as Slack does (the message is in the channel first); returns its ts."""
    ts = bot.slack.add_message(CHANNEL, f"<@U0BOT> {text}", thread_ts=thread_ts, user=user)
    await deliver(
        bot, text, ts=ts, thread_ts=thread_ts, user=user, event_id=event_id, retry_num=retry_num
    )
    return ts


async def deliver(
    bot: BotClient,
    text: str,
    *,
    ts: str,
    thread_ts: str | None,
    user: str = ALICE,
    event_id: str | None = None,
    retry_num: int | None = None,
) -> None:
    event: dict[str, Any] = {
        "type": "app_mention",
        "user": user,
        "text": f"<@U0BOT> {text}",
        "ts": ts,
        "channel": CHANNEL,
        "event_ts": ts,
        "team": "T0001",
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    body, headers = slack_requests.event_callback(
        event, signing_secret=SIGNING_SECRET, event_id=event_id, retry_num=retry_num
    )
    resp = await bot.post_slack(body, headers)
    assert resp.status == 200
    await bot.settled()


def ephemeral_texts(slack: FakeSlack, user: str = ALICE) -> list[str]:
    return [str(c.args.get("text")) for c in slack.ephemerals(user)]


async def test_status_answers_in_the_thread_with_the_build_card(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    before = len(bk.requests_to("GET", BUILD.format("web", 1)))
    await mention(bot, "status", thread_ts=root)
    (answer,) = [p for p in thread_posts(slack, root) if "web #1" in str(p.args["text"])][-1:]
    blocks = json.dumps(answer.args["blocks"])
    assert "*State*" in blocks and "Running" in blocks and "*Branch*" in blocks
    assert answer.args["metadata"]["event_payload"]["key"].startswith("mention:")
    # One Buildkite read for the answer, none to find the build (Redis and the thread say it).
    assert len(bk.requests_to("GET", BUILD.format("web", 1))) == before + 1
    assert slack.ephemerals() == []


async def test_cancel_in_the_thread_cancels_once_even_when_slack_retries_the_event(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    ts = await mention(bot, "cancel", thread_ts=root, event_id="Ev0CANCEL1")
    cancels = bk.requests_to("PUT", BUILD.format("web", 1) + "/cancel")
    assert len(cancels) == 1
    answers = [p for p in thread_posts(slack, root) if "asked to cancel" in p.args["text"]]
    assert len(answers) == 1 and f"<@{ALICE}>" in answers[0].args["text"]
    # Slack thought the answer was lost and delivers the same event again (twice).
    for retry in (1, 2):
        await deliver(bot, "cancel", ts=ts, thread_ts=root, event_id="Ev0CANCEL1", retry_num=retry)
    assert len(bk.requests_to("PUT", BUILD.format("web", 1) + "/cancel")) == 1
    assert len([p for p in thread_posts(slack, root) if "asked to cancel" in p.args["text"]]) == 1
    assert slack.ephemerals() == []
    assert await redis_client.exists("{bkchatops}:event:Ev0CANCEL1")
    assert 0 < await redis_client.ttl("{bkchatops}:event:Ev0CANCEL1") <= 3600


async def test_a_second_cancel_within_the_buttons_window_is_already_asked(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    value = json.dumps({"pipeline": "web", "number": 1})
    await bot.click("build_cancel", value, channel=CHANNEL, message_ts=root)
    await bot.settled()
    await mention(bot, "cancel", thread_ts=root, user=BOB)
    assert len(bk.requests_to("PUT", BUILD.format("web", 1) + "/cancel")) == 1
    (refusal,) = ephemeral_texts(slack, BOB)
    assert "already" in refusal and f"<@{ALICE}>" in refusal
    (shown,) = slack.ephemerals(BOB)
    assert shown.args["thread_ts"] == root


async def test_a_refusal_is_ephemeral_and_nothing_reaches_buildkite(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "locked-down")
    await move(bot, "locked-down", "running")
    posts_before = len(slack.posts(CHANNEL))
    await mention(bot, "cancel", thread_ts=root, user=BOB)
    assert bk.requests_to("PUT") == []
    (refusal,) = ephemeral_texts(slack, BOB)
    assert "You may not cancel `locked-down`" in refusal
    assert len(slack.posts(CHANNEL)) == posts_before


async def test_rebuild_starts_a_build_followed_in_the_same_thread(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "passed")
    await mention(bot, "rebuild", thread_ts=root)
    assert len(bk.requests_to("PUT", BUILD.format("web", 1) + "/rebuild")) == 1
    texts = [str(p.args["text"]) for p in thread_posts(slack, root)]
    assert any("rebuilt #1" in t and "web #2" in t for t in texts)
    assert any(t.startswith("web #2:") for t in texts)  # the new build's own message


async def test_retry_retries_the_failed_jobs_and_says_so_in_the_thread(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "failed", failed_jobs=["Test"])
    await mention(bot, "retry", thread_ts=root)
    assert [r.path for r in bk.requests_to("PUT")] == [
        "/v2" + BUILD.format("web", 1) + "/retry_failed_jobs"
    ]
    replies = [str(p.args["text"]) for p in thread_posts(slack, root)]
    assert len([t for t in replies if "retried the failed jobs" in t]) == 1


async def test_retry_of_a_build_without_failures_is_refused(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "passed")
    await mention(bot, "retry", thread_ts=root)
    assert bk.requests_to("PUT") == []
    assert any("no failed jobs" in t.lower() for t in ephemeral_texts(slack))


async def test_unblock_a_step_without_fields(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "gated")
    await move(bot, "gated", "passed", blocked=True)
    await mention(bot, "unblock", thread_ts=root)
    (put,) = bk.requests_to("PUT", BUILD.format("gated", 1) + "/jobs/")
    assert put.path.endswith("/unblock")
    assert any("unblocked *Release*" in p.args["text"] for p in thread_posts(slack, root))


async def test_unblock_of_a_step_with_fields_offers_its_button(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "forms")
    await move(bot, "forms", "passed", blocked=True)
    await mention(bot, "unblock", thread_ts=root)
    assert bk.requests_to("PUT") == []
    (offer,) = slack.ephemerals(ALICE)
    button = offer.args["blocks"][1]["elements"][0]
    assert button["action_id"] == "build_unblock"
    assert json.loads(button["value"])["pipeline"] == "forms"


async def test_unblock_when_nothing_waits_is_refused(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    await mention(bot, "unblock", thread_ts=root)
    assert bk.requests_to("PUT") == []
    assert any("not waiting on a block step" in t for t in ephemeral_texts(slack))


async def test_help_in_the_thread_names_the_build(bot: BotClient, slack: FakeSlack) -> None:
    root = await deploy(bot, "web")
    await mention(bot, "help", thread_ts=root)
    (answer,) = [p for p in thread_posts(slack, root) if "I act on" in p.args["text"]]
    assert "*web #1*" in answer.args["text"]


async def test_a_mention_outside_a_build_thread_answers_with_help(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await mention(bot, "cancel", thread_ts=None)
    (answer,) = thread_posts(slack, ts)
    assert "in a build's thread" in answer.args["text"]
    assert slack.calls_to("conversations.replies") == []  # a top-level message is no thread
    # A thread that is not a build's: its first message links no build the bot follows here.
    other = slack.add_message(CHANNEL, "lunch? https://buildkite.com/other-org/web/builds/1")
    await mention(bot, "status", thread_ts=other)
    (answer,) = [p for p in thread_posts(slack, other)]
    assert "in a build's thread" in answer.args["text"]
    assert bk.requests_to("PUT") == [] and bk.requests_to("GET", BUILD.format("web", 1)) == []


async def test_an_unknown_command_is_answered_privately_with_the_commands(
    bot: BotClient, slack: FakeSlack
) -> None:
    root = await deploy(bot, "web")
    posts_before = len(slack.posts(CHANNEL))
    await mention(bot, "<script>deploy-everything</script>", thread_ts=root)
    (text,) = ephemeral_texts(slack)
    assert "I don't know `&lt;script&gt;deploy-everything&lt;/script&gt;`" in text
    assert "`status`" in text
    assert len(slack.posts(CHANNEL)) == posts_before


async def test_a_mention_that_is_not_signed_does_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    event = {
        "type": "app_mention",
        "user": ALICE,
        "text": "<@U0BOT> cancel",
        "ts": "1.2",
        "channel": CHANNEL,
        "thread_ts": root,
    }
    body, headers = slack_requests.event_callback(event, signing_secret="not-the-secret")
    resp = await bot.post_slack(body, headers)
    assert resp.status == 401
    await bot.settled()
    assert bk.requests_to("PUT") == []


async def test_a_retried_event_over_socket_mode_does_nothing_twice(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    async with running_bot(slack, bk, redis_url, slack_app_token=slack.app_token) as bot:
        await slack.wait_socket_connected()
        ts = slack.add_message(CHANNEL, "<@U0BOT> help", user=ALICE)
        event = {
            "type": "app_mention",
            "user": ALICE,
            "text": "<@U0BOT> help",
            "ts": ts,
            "channel": CHANNEL,
            "event_ts": ts,
        }
        payload = slack_requests.event_callback_payload(event, event_id="Ev0SOCKET1")
        await slack.socket_send("events_api", payload)
        await bot.settled()
        await slack.socket_send("events_api", payload, retry_attempt=1, retry_reason="timeout")
        await bot.settled()
        assert len(thread_posts(slack, ts)) == 1


async def test_a_thread_under_someone_elses_message_linking_a_followed_build_is_no_build_thread(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    # Bob's message copies the bot's build message, link and all: the build's record names
    # the bot's own message (and its thread) only, so a cancel under Bob's does nothing.
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    copied = slack.messages[CHANNEL][root]
    forged = slack.add_message(CHANNEL, str(copied.get("text")), user=BOB)
    slack.messages[CHANNEL][forged]["blocks"] = copied.get("blocks")
    await mention(bot, "cancel", thread_ts=forged)
    assert bk.requests_to("PUT") == []
    (answer,) = thread_posts(slack, forged)
    assert "in a build's thread" in answer.args["text"]


@pytest.mark.parametrize(
    "extra",
    [
        {"bot_id": "B0BOT"},  # the bot itself: its own answers must never loop
        {"bot_id": "B0OTHER", "user": "U0OTHERBOT"},  # another bot
        {"subtype": "message_changed"},  # an edit
        {"subtype": "bot_message"},
    ],
)
async def test_mentions_from_bots_and_edits_are_never_commands(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, extra: dict[str, Any]
) -> None:
    root = await deploy(bot, "web")
    await move(bot, "web", "running")
    posts = len(slack.posts(CHANNEL))
    ts = slack.add_message(CHANNEL, "<@U0BOT> cancel", thread_ts=root, user=ALICE)
    event = {
        "type": "app_mention",
        "user": ALICE,
        "text": "<@U0BOT> cancel",
        "ts": ts,
        "channel": CHANNEL,
        "thread_ts": root,
        **extra,
    }
    body, headers = slack_requests.event_callback(event, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    await bot.settled()
    assert bk.requests_to("PUT") == []
    assert len(slack.posts(CHANNEL)) == posts and slack.calls_to("chat.postEphemeral") == []
