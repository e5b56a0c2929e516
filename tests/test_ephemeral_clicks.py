"""Buttons in ephemeral messages, and channels the bot is not in, as real Slack shapes them.

A click in an ephemeral message (a deploy confirmation, a `/buildkite build` answer) carries
`container.is_ephemeral: true` and no `message`; its ts is no thread anyone else can see.
A channel the bot was not invited to answers `not_in_channel` (or `channel_not_found` when it
is private). Driven through the bot's real port, against the fakes, which answer as Slack does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.bot import BotClient, running_bot
from tests.fakes.buildkite import FakeBuildkite
from tests.fakes.slack import FakeSlack

CHANNEL = "C0CHAN"
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
