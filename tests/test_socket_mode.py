"""Socket Mode: the same bot, reached over Slack's websocket instead of HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from app.simulators import slack_requests
from app.simulators.bot import running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack


async def test_socket_mode_deploy_round_trip(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url, slack_app_token=slack.app_token) as bot:
        await slack.wait_socket_connected(timeout=10)
        # The app token, not the bot token, opened the connection.
        (opened,) = slack.calls_to("apps.connections.open")
        assert opened.headers["Authorization"] == f"Bearer {slack.app_token}"

        ack = await slack.socket_send(
            "slash_commands",
            slack_requests.slash_command_payload(
                "/deploy", "deploy-prod", response_url=slack.response_url("sock")
            ),
        )
        assert ack is not None and "Starting a build of `deploy-prod`" in ack["text"]
        post = await slack.wait_for(lambda: slack.posts("C0CHAN"))
        assert "deploy-prod #1" in post[0].args["text"]
        creates = bk.requests_to("POST", "/organizations/acme/pipelines/deploy-prod/builds")
        assert len(creates) == 1

        # The webhook and health routes are still served on the port; /slack/events is not.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{bot.base}/healthz") as resp:
                assert resp.status == 200
            async with http.post(f"{bot.base}/slack/events", data=b"x") as resp:
                assert resp.status in (404, 405)
        bk.set_build_state("deploy-prod", 1, "passed")
        assert (await bot.webhook(bk.webhook_payload("deploy-prod", 1))).status == 200
        ts = post[0].response["ts"]
        await slack.wait_for(lambda: slack.thread("C0CHAN", ts))
    await asyncio.sleep(0)
