"""Buttons in ephemeral messages, and channels the bot is not in, as real Slack shapes them.

A click in an ephemeral message (a deploy confirmation, a `/buildkite build` answer) carries
`container.is_ephemeral: true` and no `message`; its ts is no thread anyone else can see.
A channel the bot was not invited to answers `not_in_channel` (or `channel_not_found` when it
is private). Driven through the bot's real port, against the fakes, which answer as Slack does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.core.digest import run_digest_schedules
from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

CHANNEL, PRIVATE = "C0CHAN", "C0PRIV"
ALICE, BOB = "U0USER", "U0BOB"
BUILDS = "/organizations/acme/pipelines/{}/builds"
POLICY = """\
pipelines:
  staging:
    protected: true
  prod:
    protected: true
    approval:
      approvers: [U0BOB]
"""


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_channel(PRIVATE, "secret-team", is_private=True, is_member=False)
    for slug in ("staging", "prod", "web"):
        bk.add_pipeline(slug)
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as client:
        yield client


async def answer(bot: BotClient, command: str, text: str, **kwargs: Any) -> dict[str, Any]:
    """Run a command; the bot's first answer to its response_url that carries blocks or text."""
    _, name, _ = await bot.command(command, text, **kwargs)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return posts[-1].json


async def click_ephemeral(
    bot: BotClient, reply: dict[str, Any], action_id: str, *, channel: str = CHANNEL
) -> list[str]:
    """Show `reply` to Alice as an ephemeral message, click `action_id` in it, as Slack sends
    that click (no `message`), and return the texts posted to the click's response_url."""
    ts = bot.slack.add_ephemeral(channel, ALICE, reply.get("text", ""), blocks=reply["blocks"])
    _, name = await bot.click(
        action_id,
        None,
        channel=channel,
        message_ts=ts,
        message_blocks=reply["blocks"],
        ephemeral=True,
    )
    return await bot.slack.wait_for(lambda: bot.response_texts(name))


def top_level(slack: FakeSlack, channel: str = CHANNEL) -> list[Any]:
    return [c for c in slack.posts(channel) if not c.args.get("thread_ts")]


async def test_a_confirm_click_in_the_ephemeral_confirmation_posts_the_build_in_the_channel(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    confirmation = await answer(bot, "/deploy", "staging")
    texts = await click_ephemeral(bot, confirmation, "deploy_confirm")
    assert "Started" in texts[0]
    assert len(bk.requests_to("POST", BUILDS.format("staging"))) == 1
    post = await slack.wait_for(lambda: top_level(slack))
    assert post[0].args["text"].startswith("staging #1")
    assert all(not c.args.get("thread_ts") for c in slack.posts(CHANNEL))
    # The confirmation itself was replaced through its response_url; nothing else edits it.
    (ephemeral,) = slack.ephemeral_messages[CHANNEL].values()
    assert "Started" in ephemeral["text"]
    assert [c.args["ts"] for c in slack.calls_to("chat.update")] in ([], [post[0].response["ts"]])


async def test_an_approval_asked_from_an_ephemeral_confirmation_is_posted_in_the_channel(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    confirmation = await answer(bot, "/deploy", "prod")
    texts = await click_ephemeral(bot, confirmation, "deploy_confirm")
    assert "Approval requested" in texts[0]
    (request,) = await slack.wait_for(lambda: top_level(slack))
    assert "asks to deploy" in request.args["text"]
    assert bk.requests_to("POST") == []


async def test_retry_from_a_buildkite_build_answer_is_not_threaded_under_it(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build("web", state="failed", failed_jobs=["Test"])
    details = await answer(bot, "/buildkite", "build web 1")
    texts = await click_ephemeral(bot, details, "build_retry_failed")
    assert "Retrying" in texts[0]
    retried = [r for r in bk.requests_to("PUT") if r.path.endswith("/retry_failed_jobs")]
    assert len(retried) == 1
    posts = await slack.wait_for(lambda: len(slack.posts(CHANNEL)) >= 2 and slack.posts(CHANNEL))
    assert posts
    assert any("retried" in c.args["text"].lower() for c in posts)
    ephemeral_ts = set(slack.ephemeral_messages[CHANNEL])
    assert all(c.args.get("thread_ts") not in ephemeral_ts for c in slack.posts(CHANNEL))


async def test_rebuild_from_a_buildkite_build_answer_posts_the_new_build_in_the_channel(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build("web", state="passed")
    details = await answer(bot, "/buildkite", "build web 1")
    texts = await click_ephemeral(bot, details, "build_rebuild")
    assert "Rebuild started" in texts[0]
    (post,) = await slack.wait_for(lambda: top_level(slack))
    assert post.args["text"].startswith("web #2")


async def test_a_deploy_in_a_channel_the_bot_is_not_in_says_to_invite_it(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    _, name, _ = await bot.command("/deploy", "web", channel_id=PRIVATE, channel_name="secret")
    texts = await slack.wait_for(
        lambda: [t for t in bot.response_texts(name) if "cannot post" in t]
    )
    assert "`channel_not_found`" in texts[0] and "/invite @buildkite" in texts[0]
    # It follows the first answer's "Its progress will be posted here", and corrects it.
    first, *_ = bot.response_texts(name)
    assert "will be posted here" in first and texts[0].startswith(":warning: Correction:")
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 1
    assert slack.posts(PRIVATE) == []


async def test_an_approval_in_a_channel_the_bot_is_not_in_says_to_invite_it(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    confirmation = await answer(bot, "/deploy", "prod", channel_id=PRIVATE, channel_name="secret")
    texts = await click_ephemeral(bot, confirmation, "deploy_confirm", channel=PRIVATE)
    assert "Nothing was started" in texts[0]
    assert "/invite @buildkite" in texts[0] and "`channel_not_found`" in texts[0]
    assert "Something went wrong" not in texts[0]
    assert bk.requests_to("POST") == []


async def test_a_retry_in_a_channel_the_bot_is_not_in_is_done_and_says_to_invite_it(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    slack.add_channel("C0PUB", "public-elsewhere", is_member=False)
    slack.scopes = slack.scopes - {"chat:write.public"}
    bk.add_build("web", state="failed", failed_jobs=["Test"])
    details = await answer(bot, "/buildkite", "build web 1", channel_id="C0PUB")
    texts = await click_ephemeral(bot, details, "build_retry_failed", channel="C0PUB")
    assert "Retrying the failed jobs" in texts[0]
    assert "`not_in_channel`" in texts[0] and "/invite @buildkite" in texts[0]
    assert "Something went wrong" not in texts[0]
    retried = [r for r in bk.requests_to("PUT") if r.path.endswith("/retry_failed_jobs")]
    assert len(retried) == 1
    assert slack.posts("C0PUB") == []


async def test_a_digest_for_a_channel_the_bot_is_not_in_is_logged_once_with_the_fix(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slack.add_channel(PRIVATE, "secret-team", is_private=True, is_member=False)
    bk.add_pipeline("web")
    at = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%H:%M")
    schedules = [{"channel": PRIVATE, "at": at, "window": "24h"}]
    caplog.set_level(logging.INFO)
    async with running_bot(slack, bk, redis_url, digest_schedules=schedules) as bot:
        stop = asyncio.Event()
        task = asyncio.create_task(run_digest_schedules(bot.services, stop, tick=0.02))
        try:
            await slack.wait_for(lambda: slack.calls_to("chat.postMessage"))
            await asyncio.sleep(0.2)  # many more ticks
        finally:
            stop.set()
            await task
    (refused,) = slack.calls_to("chat.postMessage")
    assert refused.response["error"] == "channel_not_found"
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING and PRIVATE in r.message]
    assert len(errors) == 1 and "invite the bot" in errors[0].message
    assert not any(r.exc_info for r in caplog.records)


async def test_an_unblock_after_the_bot_left_the_channel_is_done_and_says_to_invite_it(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("gated", block="Release")
    await bot.command("/deploy", "gated")
    (root,) = await slack.wait_for(lambda: top_level(slack))
    ts = root.response["ts"]
    bk.set_build_state("gated", 1, "passed", blocked=True)
    assert (await bot.webhook(bk.webhook_payload("gated", 1))).status == 200

    def unblock_button() -> dict[str, Any] | None:
        for block in slack.message(CHANNEL, ts)["blocks"]:
            for element in block.get("elements", []):
                if element.get("action_id") == "build_unblock":
                    return dict(element)
        return None

    unblock = await slack.wait_for(unblock_button)
    assert unblock is not None
    slack.remove_bot_from(CHANNEL)
    slack.channels[CHANNEL]["is_private"] = True
    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=ts)
    texts = await slack.wait_for(lambda: bot.response_texts(name))
    assert texts[0].startswith(":unlock: Unblocked *Release*. The bot cannot post in this")
    assert len(texts[0]) <= 150  # it fits a modal's error too
    assert "`channel_not_found`" in texts[0] and "/invite @buildkite" in texts[0]
    (put,) = bk.requests_to("PUT", "/organizations/acme/pipelines/gated/builds/1/jobs/")
    assert put.path.endswith("/unblock")


async def test_a_pipeline_created_in_a_channel_the_bot_is_not_in_says_to_invite_it(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    slack.add_channel(PRIVATE, "secret-team", is_private=True, is_member=False)
    policy = tmp_path / "policy.yml"
    policy.write_text("admins: [U0USER]\n")
    async with running_bot(
        slack,
        bk,
        redis_url,
        policy_file=str(policy),
        pipeline_templates={"default": "steps:\n  - command: make test\n"},
    ) as bot:
        reply = await answer(
            bot,
            "/buildkite",
            "pipeline create web git@github.com:acme/web.git default",
            channel_id=PRIVATE,
        )
    assert "Created the pipeline" in reply["text"]
    assert "could not be announced in this channel" in reply["text"]
    assert "/invite @buildkite" in reply["text"]
    assert "web" in bk.pipelines
