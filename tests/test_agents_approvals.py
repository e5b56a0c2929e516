"""An agent's deploy on a protected pipeline waits for a person in Slack: the whole plan in the
agent's channel, approval by someone other than the agent's person, the decision re-checked."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from tests.agents_support import (
    ALICE,
    BOB,
    BUILDS,
    CAPTAIN_TOKEN,
    CHANNEL,
    add_pipelines,
    agent_session,
    mutations,
    structured,
    write_policy,
)

OLD, NEW = "1" * 40, "2" * 40


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    add_pipelines(bk)
    bk.add_build("deploy-prod", state="passed", commit=OLD)
    bk.add_build("deploy-prod", state="failed", commit=NEW)
    async with running_bot(slack, bk, redis_url, policy_file=write_policy(tmp_path)) as client:
        yield client


def value_of(blocks: list[dict[str, Any]], action_id: str) -> str:
    for block in blocks:
        for element in block.get("elements", []):
            if element.get("action_id") == action_id:
                return str(element["value"])
    raise AssertionError(f"no {action_id} in {blocks}")


async def approval_message(slack: FakeSlack) -> tuple[str, str, str]:
    """The approval request's ts, its text and blocks, and the Approve button's value."""
    post = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to deploy" in c.args["text"]]
    )
    ts = post[0].response["ts"]
    message = slack.message(CHANNEL, ts)
    return ts, json.dumps(message["blocks"]), value_of(message["blocks"], "approval_approve")


async def test_a_protected_deploy_waits_for_a_person_and_starts_when_approved(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(
            session,
            "deploy",
            pipeline="deploy-prod",
            branch="main",
            env={"REGION": "eu-west-1", "DRY_RUN": "false"},
            idempotency_key="release-42",
        )
        assert asked["status"] == "awaiting_approval" and "build" not in asked
        request_id = asked["request_id"]
        assert mutations(bk) == []

        # The whole plan, in the agent's channel, naming the agent and its person.
        ts, blocks, approve = await approval_message(slack)
        assert "agent `captain` (acting for <@U0USER>) asks to deploy `deploy-prod`" in blocks
        assert "nor the person it acts for" in blocks
        assert "`main`" in blocks and NEW[:12] in blocks  # the branch and the resolved commit
        assert f"https://github.com/acme/deploy-prod/compare/{OLD}...{NEW}" in blocks
        assert "REGION=eu-west-1" in blocks and "DRY_RUN=false" in blocks

        pending = await structured(session, "get_request", request_id=request_id)
        assert pending == {"status": "awaiting_approval"}

        # The person the agent acts for may not approve it: that would be self-approval.
        _, own = await bot.click(
            "approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=ALICE
        )
        said = await slack.wait_for(lambda: bot.response_texts(own))
        assert "the agent asking acts for you" in said[0]
        assert mutations(bk) == []

        waiting = asyncio.create_task(
            structured(session, "wait_for_request", request_id=request_id, timeout_seconds=30)
        )
        _, ok = await bot.click(
            "approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=BOB
        )
        done = await asyncio.wait_for(waiting, 30)
        assert "Approved. Started" in (await slack.wait_for(lambda: bot.response_texts(ok)))[0]
        assert done["status"] == "approved"
        assert done["build"]["number"] == 3 and done["build"]["pipeline"] == "deploy-prod"
        (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
        meta = create.json["meta_data"]
        assert meta["chatops_requested_by"] == "agent:captain"
        assert meta["chatops_approved_by"] == BOB
        assert create.json["env"] == {"REGION": "eu-west-1", "DRY_RUN": "false"}
        await slack.wait_for(
            lambda: "was approved by <@U0BOB>" in slack.message(CHANNEL, ts)["text"]
        )

        # The same call again (a retry with its key) is answered, not done again.
        again = await structured(
            session,
            "deploy",
            pipeline="deploy-prod",
            branch="main",
            env={"REGION": "eu-west-1", "DRY_RUN": "false"},
            idempotency_key="release-42",
        )
        assert again == asked
    assert len(bk.requests_to("POST", BUILDS.format("deploy-prod"))) == 1
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]
    outcomes = [(e["user"], e["action"], e["outcome"]) for e in entries]
    assert ("agent:captain", "mcp deploy", "awaiting_approval") in outcomes
    assert ("agent:captain", "deploy", "approval requested") in outcomes
    assert (ALICE, "approve", "refused") in outcomes
    assert (BOB, "approve", "approved") in outcomes
    assert ("agent:captain", "mcp deploy", "repeated") in outcomes
    tool_call = next(e for e in entries if e["action"] == "mcp deploy")
    assert "for U0USER" in tool_call["detail"] and "REGION" in tool_call["detail"]


async def test_a_rejection_is_what_the_wait_returns_and_nothing_starts(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(session, "deploy", pipeline="deploy-prod")
        ts, _, approve = await approval_message(slack)
        await bot.click("approval_reject", approve, channel=CHANNEL, message_ts=ts, user_id=BOB)
        done = await structured(
            session, "wait_for_request", request_id=asked["request_id"], timeout_seconds=30
        )
    assert done["status"] == "rejected"
    assert mutations(bk) == []


async def test_the_decision_is_checked_again_when_it_takes_effect(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(session, "deploy", pipeline="deploy-prod")
        ts, _, approve = await approval_message(slack)
        # Someone else locks the pipeline before the approval.
        await bot.command("/deploy", "lock deploy-prod freeze for the incident", user_id="U0ADMIN")
        await bot.settled()
        await bot.click("approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=BOB)
        done = await structured(
            session, "wait_for_request", request_id=asked["request_id"], timeout_seconds=30
        )
    assert done["status"] == "rejected" and "locked" in done["reason"]
    assert mutations(bk) == []


async def test_another_agents_request_is_not_its_to_read(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    from tests.agents_support import THRIFTY_TOKEN

    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(session, "deploy", pipeline="deploy-prod")
    async with agent_session(bot, THRIFTY_TOKEN) as other:
        result = await other.call_tool("get_request", {"request_id": asked["request_id"]})
    assert result.is_error
    assert "no approval request" in "".join(getattr(c, "text", "") for c in result.content)
