"""SIGTERM: the bot stops taking work, finishes what it acknowledged, exits in bounded time, and
leaves its pending builds in Redis for the next start."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from app.simulators import slack_requests
from app.simulators.bot import BUILDKITE_TOKEN, SIGNING_SECRET, WEBHOOK_TOKEN
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import free_port
from app.simulators.slack import FakeSlack
from app.storage import keys

ROOT = Path(__file__).resolve().parent.parent


async def test_sigterm_finishes_in_flight_work_and_exits_cleanly(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    bk.add_pipeline("web")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "BUILDKITE_"))}
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=slack.api_url,
        SLACK_HOOKS_URL=slack.hooks_url,
        BUILDKITE_API_TOKEN=BUILDKITE_TOKEN,
        BUILDKITE_ORG=bk.org,
        BUILDKITE_API_URL=bk.url,
        BUILDKITE_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        REDIS_URL=redis_url,
        PORT=str(port),
        POLICY_FILE=str(tmp_path / "none.yml"),
        PYTHONPATH=str(ROOT),
    )
    log = (tmp_path / "bot.log").open("wb")
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", env=env, cwd=tmp_path, stdout=log, stderr=log
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "bot.log").read_text()
                await asyncio.sleep(0.1)
            # Slow Buildkite: the deploy is acknowledged, then still at work when SIGTERM comes.
            bk.delay_next(1, 1.5, "/builds", method="POST")
            body, headers = slack_requests.slash_command(
                "/deploy",
                "web",
                response_url=slack.response_url("r"),
                signing_secret=SIGNING_SECRET,
            )
            async with http.post(
                f"http://127.0.0.1:{port}/slack/events", data=body, headers=headers
            ) as resp:
                assert resp.status == 200
            await asyncio.sleep(0.3)
            started = time.monotonic()
            bot.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(bot.wait(), timeout=30)
            took = time.monotonic() - started
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()
        log.close()
    output = (tmp_path / "bot.log").read_text()
    assert code == 0, output
    assert took < 15, f"shutdown took {took:.1f}s"
    assert "shutting down" in output
    # The deploy acknowledged before SIGTERM was carried out: one build, its message posted.
    assert len(bk.requests_to("POST", "/organizations/acme/pipelines/web/builds")) == 1
    assert slack.posts("C0CHAN")
    # ...and the build, not finished yet, is still pending in Redis for the next start.
    assert await redis_client.zcard(keys.PENDING_KEY) == 1
