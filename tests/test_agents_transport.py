"""The /mcp route as a transport: served in Socket Mode too, one budget across replicas, waits
that end at shutdown, and errors that say a reference id found on the bot's log lines."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from app.simulators.bot import BUILDKITE_TOKEN, BotLog, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.agents_support import (
    AGENT_TOKENS,
    BUILDS,
    CAPTAIN_TOKEN,
    THRIFTY_TOKEN,
    add_pipelines,
    agent_session,
    call,
    error_text,
    structured,
    write_policy,
)


async def test_mcp_is_served_in_socket_mode_too(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    add_pipelines(bk)
    policy = write_policy(tmp_path)
    async with running_bot(
        slack, bk, redis_url, policy_file=policy, slack_app_token=slack.app_token
    ) as bot:
        async with agent_session(bot, CAPTAIN_TOKEN) as session:
            started = await structured(session, "deploy", pipeline="web")
        assert started["status"] == "started"
        assert len(bk.requests_to("POST", BUILDS.format("web"))) == 1


async def test_a_budget_is_one_across_replicas(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    add_pipelines(bk)
    policy = write_policy(tmp_path)
    async with (
        running_bot(slack, bk, redis_url, policy_file=policy) as one,
        running_bot(slack, bk, redis_url, policy_file=policy) as two,
    ):
        async with agent_session(one, THRIFTY_TOKEN) as first:
            assert (await structured(first, "deploy", pipeline="web"))["status"] == "started"
        async with agent_session(two, THRIFTY_TOKEN) as second:
            refused = await structured(second, "deploy", pipeline="web", branch="other")
    assert refused["status"] == "refused" and "1 mutations per hour" in refused["reason"]
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 1


async def test_waits_in_progress_answer_when_the_bot_stops(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    add_pipelines(bk)
    bk.add_build("web", state="running")
    policy = write_policy(tmp_path)
    async with (
        running_bot(slack, bk, redis_url, policy_file=policy) as bot,
        agent_session(bot, CAPTAIN_TOKEN) as session,
    ):
        await structured(session, "wait_for_build", pipeline="web", number=1, timeout_seconds=0)
        waiting = asyncio.create_task(
            structured(session, "wait_for_build", pipeline="web", number=1, timeout_seconds=50)
        )
        await slack.wait_for(lambda: bot.bot.mcp.gateway.changes.waiting)  # the wait began
        await bot.bot.mcp.stop_waits()  # what shutdown does first
        done = await asyncio.wait_for(waiting, 10)
    assert done["reached"] is False and done["build"]["state"] == "running"


async def test_an_error_says_a_reference_that_the_log_lines_carry(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
    bot_log: BotLog,
) -> None:
    add_pipelines(bk)
    bk.add_build("web", state="passed")
    async with running_bot(slack, bk, redis_url, policy_file=write_policy(tmp_path)) as bot:
        bk.fail_next(1, status=401, path_contains="/builds/1")
        async with agent_session(bot, CAPTAIN_TOKEN) as session:
            failed = await call(session, "get_build", pipeline="web", number=1)
    text = error_text(failed)
    assert "Buildkite rejected the bot's API token (401)" in text
    reference = text.rsplit("(reference ", 1)[1].rstrip(")")
    lines = [e for e in bot_log.entries() if e.get("correlation_id") == reference]
    assert any("mcp get_build" in str(e.get("message", "")) for e in lines), lines
    assert BUILDKITE_TOKEN not in text
    assert bot_log.leaks(*AGENT_TOKENS) == []


async def test_without_agents_in_the_policy_mcp_refuses_everyone(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    async with running_bot(slack, bk, redis_url) as bot:  # no policy file: no agents
        assert bot.bot.mcp.manager is None
        for auth in ({}, {"Authorization": f"Bearer {CAPTAIN_TOKEN}"}):
            async with bot.http.post(f"{bot.base}/mcp", json={}, headers=auth) as resp:
                assert resp.status == 401
    assert bk.requests_to("POST") == []


async def test_a_wait_wakes_on_the_embedded_store_too(
    slack: FakeSlack, bk: FakeBuildkite, tmp_path: Path
) -> None:
    add_pipelines(bk)
    policy = write_policy(tmp_path)
    async with (
        running_bot(slack, bk, None, policy_file=policy) as bot,  # no REDIS_URL
        agent_session(bot, CAPTAIN_TOKEN) as session,
    ):
        assert (await structured(session, "deploy", pipeline="web"))["status"] == "started"
        waiting = asyncio.create_task(
            structured(session, "wait_for_build", pipeline="web", number=1, timeout_seconds=30)
        )
        await slack.wait_for(lambda: bot.bot.mcp.gateway.changes.waiting)
        bk.set_build_state("web", 1, "canceled")
        assert (await bot.webhook(bk.webhook_payload("web", 1))).status == 200
        done = await asyncio.wait_for(waiting, 30)
    assert done["reached"] is True and done["build"]["state"] == "canceled"


@pytest.mark.parametrize("mode", ["auto", "legacy", "2026-07-28"])
async def test_the_sdks_high_level_client_in_every_protocol_era(
    mode: str,
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
) -> None:
    add_pipelines(bk)
    async with running_bot(slack, bk, redis_url, policy_file=write_policy(tmp_path)) as bot:
        headers = {"Authorization": f"Bearer {CAPTAIN_TOKEN}"}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0)) as http,
            Client(
                streamable_http_client(f"{bot.base}/mcp", http_client=http), mode=mode
            ) as client,
        ):
            result = await client.call_tool("whoami", {})
    assert isinstance(result, types.CallToolResult) and not result.is_error
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["agent"] == "captain"
