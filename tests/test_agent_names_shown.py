"""An agent is named as an agent wherever people read about what it asked for: its id
(`agent:<name>`) is no Slack user id, and written as `<@agent:…>` it would be a broken mention
of nobody (and, with a name Slack could resolve, a mention of someone else)."""

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
from tests.agents_support import (
    BOB,
    CAPTAIN_TOKEN,
    CHANNEL,
    add_pipelines,
    agent_session,
    structured,
    write_policy,
)


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    add_pipelines(bk)
    bk.add_build("deploy-prod", state="passed", commit="1" * 40)
    async with running_bot(slack, bk, redis_url, policy_file=write_policy(tmp_path)) as client:
        yield client


async def test_an_agents_approval_request_on_the_approvers_home_names_the_agent(
    bot: BotClient, slack: FakeSlack
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(
            session, "deploy", pipeline="deploy-prod", branch="main", idempotency_key="home-1"
        )
    assert asked["status"] == "awaiting_approval"
    await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to deploy" in c.args["text"]]
    )

    event = {"type": "app_home_opened", "user": BOB, "channel": "D0BOB", "tab": "home"}
    body, headers = slack_requests.event_callback(event, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    home = await slack.wait_for(lambda: slack.home_views.get(BOB))
    assert home is not None
    shown = json.dumps(home["blocks"])
    assert "agent `captain` asks for a deploy of `deploy-prod`" in shown
    assert "<@agent:" not in shown


async def test_an_agents_deployment_is_credited_to_the_agent_in_the_history(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        started = await structured(
            session, "deploy", pipeline="web", branch="main", idempotency_key="hist-1"
        )
    assert started["status"] == "started", started
    number = int(bk.builds_of("web")[-1]["number"])
    bk.set_build_state("web", number, "passed")
    assert (await bot.webhook(bk.webhook_payload("web", number))).status == 200
    await bot.settled()

    _, name, _ = await bot.command("/deploy", "history web", user_id=BOB)
    posts = await slack.wait_for(lambda: [p for p in slack.responses if p.name == name])
    shown = json.dumps(posts[-1].json)
    assert f"#{number}" in shown and "by agent `captain`" in shown
    assert "someone outside Slack" not in shown and "<@agent:" not in shown


async def test_an_agents_failed_build_is_dmed_to_the_person_it_acts_for_not_looked_up(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    """Slack knows no user `agent:captain`: the inbox neither looks it up nor opens a DM with
    it; the build's DM goes to the person the agent acts for (U0USER, failures by default)."""
    slack.add_user("U0USER", "lead", "lead@example.com")
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        started = await structured(
            session, "deploy", pipeline="web", branch="main", idempotency_key="dm-1"
        )
    assert started["status"] == "started", started
    number = int(bk.builds_of("web")[-1]["number"])
    bk.set_build_state("web", number, "failed", failed_jobs=["Test"])
    assert (await bot.webhook(bk.webhook_payload("web", number))).status == 200
    await bot.settled()
    await slack.wait_for(lambda: slack.calls_to("conversations.open"))
    assert [c.args["users"] for c in slack.calls_to("conversations.open")] == ["U0USER"]
    looked_up = [c.args.get("user") for c in slack.calls_to("users.info")]
    assert not [u for u in looked_up if str(u).startswith("agent:")]
