"""`python -m app mcp`: the SDK's stdio client drives a real process that opens the bot's
services from the same settings; with a shared Redis the running bot posts its builds."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from app.simulators.bot import BUILDKITE_TOKEN, SIGNING_SECRET, WEBHOOK_TOKEN, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.agents_support import (
    AGENT_TOKENS,
    BUILDS,
    CAPTAIN_TOKEN,
    CHANNEL,
    add_pipelines,
    write_policy,
)

ROOT = Path(__file__).resolve().parent.parent


def mcp_env(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, policy: str, token: str | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "BUILDKITE_"))}
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=slack.api_url,
        BUILDKITE_API_TOKEN=BUILDKITE_TOKEN,
        BUILDKITE_ORG=bk.org,
        BUILDKITE_API_URL=bk.url,
        BUILDKITE_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        REDIS_URL=redis_url,
        POLICY_FILE=policy,
        PYTHONPATH=str(ROOT),
        LOG_LEVEL="DEBUG",
    )
    env.pop("BKCHATOPS_AGENT_TOKEN", None)
    if token is not None:
        env["BKCHATOPS_AGENT_TOKEN"] = token
    return env


async def test_a_deploy_over_stdio_is_followed_by_the_running_bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    add_pipelines(bk)
    policy = write_policy(tmp_path)
    errors = tmp_path / "mcp.log"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "app", "mcp"],
        env=mcp_env(slack, bk, redis_url, policy, CAPTAIN_TOKEN),
        cwd=tmp_path,
    )
    async with running_bot(slack, bk, redis_url, policy_file=policy) as bot:
        with errors.open("w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                names = {t.name for t in (await session.list_tools()).tools}
                assert "deploy" in names and "wait_for_build" in names
                result = await session.call_tool("deploy", {"pipeline": "web"})
                assert isinstance(result, types.CallToolResult) and not result.is_error
                assert isinstance(result.structured_content, dict)
                assert result.structured_content["status"] == "started"
        # The running bot's notifier, not the stdio process, posts the build's message.
        post = await slack.wait_for(lambda: slack.posts(CHANNEL), timeout=60)
        assert "agent `captain`" in str(post[0].args["blocks"])
        await bot.settled()
    (create,) = bk.requests_to("POST", BUILDS.format("web"))
    assert create.json["meta_data"]["chatops_requested_by"] == "agent:captain"
    log = errors.read_text()
    assert "serving agent captain over stdio" in log
    assert not any(token in log for token in AGENT_TOKENS)


async def test_without_a_known_token_the_stdio_server_does_not_start(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path)
    for token, said in ((None, "is not set"), ("not-a-token", "is no agent's token")):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "mcp",
            env=mcp_env(slack, bk, redis_url, policy, token),
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 2
        assert out == b""  # stdout is the protocol's: nothing for people there
        assert f"BKCHATOPS_AGENT_TOKEN {said}" in err.decode()
        assert b"not-a-token" not in err
    assert bk.requests == [] and slack.calls == []
