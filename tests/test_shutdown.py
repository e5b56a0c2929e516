"""SIGTERM: the bot stops taking work, finishes what it acknowledged, exits in bounded time, and
leaves its pending builds in Redis for the next start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
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
    env = bot_env(
        slack.api_url,
        bk,
        redis_url,
        port,
        tmp_path,
        SLACK_HOOKS_URL=slack.hooks_url,
        SLACK_BOT_TOKEN=slack.bot_token,
    )
    async with bot_process(env, tmp_path) as bot, aiohttp.ClientSession() as http:
        await wait_healthy(http, port, tmp_path)
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
        code, took = await terminate(bot)
    output = (tmp_path / "bot.log").read_text()
    assert code == 0, output
    assert took < 15, f"shutdown took {took:.1f}s"
    assert "shutting down" in output
    # The deploy acknowledged before SIGTERM was carried out: one build, its message posted.
    assert len(bk.requests_to("POST", "/organizations/acme/pipelines/web/builds")) == 1
    assert slack.posts("C0CHAN")
    # ...and the build, not finished yet, is still pending in Redis for the next start.
    assert await redis_client.zcard(keys.PENDING_KEY) == 1


async def test_sigterm_stops_socket_mode_while_slack_holds_the_connection(
    bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    """Slack answers `auth.test` but never `apps.connections.open`: the bot is still connecting
    when SIGTERM comes, and must exit within the grace anyway."""
    slack = HoldingSlack()
    server = await asyncio.start_server(slack.serve, "127.0.0.1", 0)
    slack_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/api/"
    port = free_port()
    env = bot_env(slack_url, bk, redis_url, port, tmp_path, SLACK_APP_TOKEN="xapp-1-A1-2-held")
    async with bot_process(env, tmp_path) as bot:
        async with aiohttp.ClientSession() as http:
            await wait_healthy(http, port, tmp_path)
        deadline = time.monotonic() + 60
        while "apps.connections.open" not in slack.paths:
            assert time.monotonic() < deadline, (tmp_path / "bot.log").read_text()
            await asyncio.sleep(0.1)
        code, took = await terminate(bot)
    server.close()
    await slack.release()
    output = (tmp_path / "bot.log").read_text()
    assert code == 0, output
    assert took < 10, f"shutdown took {took:.1f}s\n{output}"
    assert "shutting down" in output
    assert "connected to Slack in Socket Mode" not in output
    assert "Traceback" not in output, output


class HoldingSlack:
    """A Slack Web API that answers `auth.test` and holds every other request unanswered."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.held: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while request_line := await reader.readline():
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            path = request_line.split()[1].decode().rsplit("/", 1)[-1].split("?")[0]
            self.paths.append(path)
            if path != "auth.test":
                self.held.append(writer)
                return
            body = b'{"ok": true, "user_id": "U0BOT", "team_id": "T0TEAM", "bot_id": "B0BOT"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()

    async def release(self) -> None:
        for writer in self.held:
            writer.close()


def bot_env(
    slack_url: str, bk: FakeBuildkite, redis_url: str, port: int, tmp_path: Path, **extra: str
) -> dict[str, str]:
    """The environment of `python -m app` against these fakes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "BUILDKITE_"))}
    env.update(
        SLACK_BOT_TOKEN="xoxb-test",
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=slack_url,
        BUILDKITE_API_TOKEN=BUILDKITE_TOKEN,
        BUILDKITE_ORG=bk.org,
        BUILDKITE_API_URL=bk.url,
        BUILDKITE_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        REDIS_URL=redis_url,
        PORT=str(port),
        POLICY_FILE=str(tmp_path / "none.yml"),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


async def wait_healthy(http: aiohttp.ClientSession, port: int, tmp_path: Path) -> None:
    deadline = time.monotonic() + 120  # a process's start-up, on a loaded machine
    while True:
        try:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, (tmp_path / "bot.log").read_text()
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def bot_process(env: dict[str, str], tmp_path: Path) -> AsyncIterator[Process]:
    """`python -m app` for the block, its output in `bot.log`; killed if it outlives the block."""
    log = (tmp_path / "bot.log").open("wb")
    bot = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", env=env, cwd=tmp_path, stdout=log, stderr=log
    )
    try:
        yield bot
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()
        log.close()


async def terminate(bot: Process) -> tuple[int, float]:
    """SIGTERM, then the exit code and how long the exit took."""
    started = time.monotonic()
    bot.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(bot.wait(), timeout=30)
    return code, time.monotonic() - started


async def test_the_steps_of_a_stop_share_one_budget(monkeypatch: Any) -> None:
    """Each step of a shutdown waits at most what the earlier ones left, so a stop in which
    every step hangs still ends after about one grace, not one grace per step."""
    from app.ops.shutdown import FLOOR, StopBudget

    loop = asyncio.get_running_loop()
    now = [1000.0]
    monkeypatch.setattr(loop, "time", lambda: now[0])
    budget = StopBudget(10.0)
    assert budget.left() == 10.0  # not stopping yet: a step would get the whole budget
    budget.start()
    now[0] += 4.0
    assert budget.left() == 6.0
    budget.start()  # a second start (the `finally` after a clean stop) keeps the first
    now[0] += 5.5
    assert budget.left() == 0.5
    now[0] += 30.0
    assert budget.left() == FLOOR  # spent: later steps only run what is ready
