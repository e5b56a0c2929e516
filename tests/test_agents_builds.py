"""Agents acting on builds that exist: unblocking with a form's fields, waiting on a build the
bot did not start (followed from then on), and a protected rebuild asked for like a deploy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot, work_requests
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage.store import Store
from tests.agents_support import (
    BOB,
    BUILDS,
    CAPTAIN_TOKEN,
    CHANNEL,
    INTRUDER_TOKEN,
    add_pipelines,
    agent_session,
    mutations,
    structured,
    write_policy,
)

FIELDS: list[dict[str, Any]] = [
    {"text": "Release name", "key": "release-name"},
    {
        "select": "Stream",
        "key": "release-stream",
        "required": False,
        "default": "beta",
        "options": [{"label": "Beta", "value": "beta"}, {"label": "Stable", "value": "stable"}],
    },
]


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    add_pipelines(bk)
    bk.add_pipeline("release", block="Request release", block_fields=FIELDS)
    async with running_bot(slack, bk, redis_url, policy_file=write_policy(tmp_path)) as client:
        yield client


def unblocks(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests_to("PUT") if r.path.endswith("/unblock")]


async def test_an_agent_unblocks_a_block_step_with_checked_fields(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        started = await structured(session, "deploy", pipeline="release")
        assert started["status"] == "started"
        waiting = asyncio.create_task(
            structured(
                session,
                "wait_for_build",
                pipeline="release",
                number=1,
                until="blocked",
                timeout_seconds=30,
            )
        )
        bk.set_build_state("release", 1, "passed", blocked=True)
        assert (await bot.webhook(bk.webhook_payload("release", 1))).status == 200
        blocked = await asyncio.wait_for(waiting, 30)
        assert blocked["reached"] is True and blocked["build"]["blocked"] is True

        missing = await structured(session, "unblock_job", pipeline="release", number=1)
        wrong = await structured(
            session,
            "unblock_job",
            pipeline="release",
            number=1,
            fields={"release-name": "R1", "release-stream": "nightly"},
        )
        assert missing["status"] == "refused" and "release-name" in missing["reason"]
        assert wrong["status"] == "refused" and "'nightly' is not an option" in wrong["reason"]
        assert unblocks(bk) == []

        # Buildkite refuses once: said plainly, and the same call may then be tried again.
        bk.fail_next(1, status=403, path_contains="/unblock")
        denied = await structured(
            session, "unblock_job", pipeline="release", number=1, fields={"release-name": "R1"}
        )
        assert denied["status"] == "refused"
        assert "Could not unblock `release` #1" in denied["reason"]
        done = await structured(
            session, "unblock_job", pipeline="release", number=1, fields={"release-name": "R1"}
        )
    assert done["status"] == "started"
    failed, put = unblocks(bk)
    assert failed.json == put.json
    # The stream's default, as the person's form would have sent it.
    assert put.json["fields"] == {"release-name": "R1", "release-stream": "beta"}
    await bot.settled()
    said = json.dumps([c.args for c in slack.posts(CHANNEL)])
    assert "agent `captain` unblocked *Request release*" in said


async def test_waiting_on_a_build_the_bot_did_not_start_follows_it_from_then_on(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build("web", state="running")
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        now = await structured(
            session, "wait_for_build", pipeline="web", number=1, timeout_seconds=0
        )
        assert now["reached"] is False and now["build"]["state"] == "running"
        # Followed now: its message is in the agent's channel.
        await slack.wait_for(lambda: slack.posts(CHANNEL))
        await bot.settled()
        asked = len(work_requests(bk))
        waiting = asyncio.create_task(
            structured(session, "wait_for_build", pipeline="web", number=1, timeout_seconds=30)
        )
        bk.set_build_state("web", 1, "failed", failed_jobs=["Test"])
        assert (await bot.webhook(bk.webhook_payload("web", 1))).status == 200
        done = await asyncio.wait_for(waiting, 30)
    assert done["reached"] is True and done["build"]["state"] == "failed"
    # Waiting asked Buildkite nothing: what followed the webhook is the notifier's failure reply
    # reading the build's jobs and its log tail.
    after = [r.path for r in work_requests(bk)[asked:]]
    assert len(after) <= 2 and all(p.endswith(("/builds/1", "/log")) for p in after), after


async def test_an_agent_without_a_right_on_the_pipeline_makes_the_bot_follow_nothing(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    bk.add_build("web", state="running")
    bk.add_build("bob-only", state="passed")
    async with agent_session(bot, INTRUDER_TOKEN) as session:
        # The intruder is granted nothing: the build's state now, read once, and no wait.
        running = await structured(
            session, "wait_for_build", pipeline="web", number=1, timeout_seconds=30
        )
        started = await structured(
            session, "wait_for_build", pipeline="web", number=1, until="running"
        )
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        # The captain is granted bob-only, but the person it acts for is not: bounded by them.
        passed = await structured(session, "wait_for_build", pipeline="bob-only", number=1)
    assert running["reached"] is False and running["build"]["state"] == "running"
    assert "agent intruder has no right on web" in running["reason"]
    assert started["reached"] is True and "read once" in started["reason"]
    assert passed["reached"] is True and passed["build"]["state"] == "passed"
    assert "agent captain has no right on bob-only" in passed["reason"]
    # Not followed: nothing posted, nothing recorded, and its end is no news in Slack either.
    store = Store(redis_client)
    assert await store.find("web", 1) is None and await store.find("bob-only", 1) is None
    bk.set_build_state("web", 1, "failed", failed_jobs=["Test"])
    assert (await bot.webhook(bk.webhook_payload("web", 1))).status == 200
    await bot.settled()
    assert slack.posts(CHANNEL) == []
    assert mutations(bk) == []


async def test_a_protected_rebuild_is_asked_for_like_a_deploy(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build("deploy-prod", state="failed")
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(session, "rebuild_build", pipeline="deploy-prod", number=1)
        status = await structured(session, "get_request", request_id=asked["request_id"])
    assert asked["status"] == "awaiting_approval" and status["status"] == "awaiting_approval"
    assert mutations(bk) == []
    post = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to rebuild" in c.args["text"]]
    )
    assert "agent `captain` (acting for <@U0USER>)" in post[0].args["text"]
    assert "Approval needed from <@U0BOB> (not the requester" in post[0].args["text"]
    assert bk.requests_to("POST", BUILDS.format("deploy-prod")) == []
