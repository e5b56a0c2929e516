"""A bot under test, driven the way Slack and Buildkite drive it: signed HTTP to its real port.

Part of the sandbox's and the tests' simulators of Slack and Buildkite.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
from redis.exceptions import ResponseError

from app.core.services import Services
from app.main import RunningBot, start_bot
from app.ops import logs
from app.settings import Settings
from app.simulators import slack_requests
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.simulators.slack_state import WAIT_TIMEOUT
from app.storage.keys import EVENTS_GROUP, EVENTS_STREAM
from app.tuning import DEFAULT, DeployTuning, SlackPacing, TrackingTuning, Tuning

SIGNING_SECRET = "test-signing-secret"
WEBHOOK_TOKEN = "test-webhook-token"
BUILDKITE_TOKEN = "bk-test-token"
#: Every secret a test bot is given (FakeSlack's default bot token first).
SECRETS = ("xoxb-test", SIGNING_SECRET, BUILDKITE_TOKEN, WEBHOOK_TOKEN)
#: A bot under test that does not wait on Slack's pacing (the fakes have no rate limit), stops
#: within a short stream read, and sweeps expired approvals often; tests of the pacing itself
#: run with `DEFAULT`.
FAST = Tuning(
    slack=SlackPacing(post_interval=0.0, edit_interval=0.0),
    tracking=TrackingTuning(read_block_ms=20),
    deploys=DeployTuning(approval_sweep_interval=0.1),
)


def bot_settings(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str | None, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "slack_bot_token": slack.bot_token,
        "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": slack.api_url,
        "slack_hooks_url": slack.hooks_url,
        "buildkite_api_token": BUILDKITE_TOKEN,
        "buildkite_org": bk.org,
        "buildkite_api_url": bk.url,
        "buildkite_webhook_token": WEBHOOK_TOKEN,
        "redis_url": redis_url,
        "port": 3000,
        "poll_interval": 3600,  # tests drive polls themselves unless they say otherwise
        "policy_file": "/nonexistent/policy.yml",  # open policy unless a test gives one
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


def work_requests(bk: FakeBuildkite) -> list[Any]:
    """Requests the bot sent Buildkite for work, leaving out its start-up token check."""
    return [r for r in bk.requests if r.path != "/v2/access-token"]


class BotClient:
    """Sends signed Slack requests and Buildkite webhooks to a running bot."""

    def __init__(
        self, bot: RunningBot, slack: FakeSlack, bk: FakeBuildkite, tuning: Tuning = DEFAULT
    ) -> None:
        self.bot = bot
        #: What the bot was started with, for a test's waits (its pacing, its lock times).
        self.tuning = tuning
        self.slack = slack
        self.bk = bk
        self.base = f"http://127.0.0.1:{bot.port}"
        self.http = aiohttp.ClientSession()
        self._responses = 0

    @property
    def services(self) -> Services:
        return self.bot.services

    async def close(self) -> None:
        await self.http.close()

    async def settled(self, timeout: float = WAIT_TIMEOUT) -> None:  # noqa: ASYNC109
        """Wait until the bot has done all it was given: its requests' work is finished, the
        notifier has read and acknowledged every recorded transition, and no Slack write is in
        flight. A test asserts that something did *not* happen after this, not after a sleep."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        services = self.services
        while True:
            busy = [t for t in services.inflight if not t.done()]
            if busy:
                await asyncio.wait(busy, timeout=max(0.0, deadline - loop.time()))
            await services.notifier.finish_writing(max(0.0, deadline - loop.time()))
            await services.outbox.drain()
            if not busy and await self._stream_consumed():
                return
            if loop.time() >= deadline:
                raise AssertionError(f"the bot did not settle within {timeout}s")
            await asyncio.sleep(0.01)

    async def _stream_consumed(self) -> bool:
        try:
            groups = await self.services.redis.xinfo_groups(EVENTS_STREAM)
        except ResponseError:  # no stream yet: nothing was recorded
            return True
        return all(
            not g["pending"] and not g.get("lag")
            for g in groups
            if g["name"] in (EVENTS_GROUP, EVENTS_GROUP.encode())
        )

    def new_response_url(
        self, *, channel: str | None = None, message_ts: str | None = None
    ) -> tuple[str, str]:
        self._responses += 1
        name = f"r{self._responses}"
        return name, self.slack.response_url(name, channel=channel, message_ts=message_ts)

    async def post_slack(self, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        async with self.http.post(f"{self.base}/slack/events", data=body, headers=headers) as resp:
            await resp.read()
            return resp

    async def command(
        self, command: str, text: str = "", **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, str, dict[str, Any]]:
        """POST a signed slash command; returns the response, its response_url name and JSON."""
        name, url = self.new_response_url()
        body, headers = slack_requests.slash_command(
            command, text, response_url=url, signing_secret=SIGNING_SECRET, **kwargs
        )
        async with self.http.post(f"{self.base}/slack/events", data=body, headers=headers) as resp:
            raw = await resp.read()
            payload = json.loads(raw) if raw.startswith(b"{") else {"text": raw.decode()}
            return resp, name, payload

    async def click(
        self, action_id: str, value: str | None, *, channel: str, message_ts: str, **kwargs: Any
    ) -> tuple[aiohttp.ClientResponse, str]:
        """POST a signed block_actions payload for a button of a message.

        With `ephemeral=True` the click has Slack's shape for an ephemeral message (no
        `message`), and its response_url edits the fake's ephemeral at `message_ts`.
        """
        if kwargs.get("ephemeral"):
            name, url = self.new_response_url(channel=channel, message_ts=message_ts)
        else:
            name, url = self.new_response_url()
        body, headers = slack_requests.block_action(
            action_id,
            value,
            response_url=url,
            signing_secret=SIGNING_SECRET,
            channel_id=channel,
            message_ts=message_ts,
            **kwargs,
        )
        resp = await self.post_slack(body, headers)
        return resp, name

    async def webhook(
        self,
        payload: dict[str, Any],
        *,
        token: str | None = WEBHOOK_TOKEN,
        signed: bool = False,
        timestamp: int | None = None,
    ) -> aiohttp.ClientResponse:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "X-Buildkite-Event": payload["event"]}
        if signed:
            ts = str(int(time.time()) if timestamp is None else timestamp)
            digest = hmac.new(
                (token or "").encode(), f"{ts}.".encode() + body, hashlib.sha256
            ).hexdigest()
            headers["X-Buildkite-Signature"] = f"timestamp={ts},signature={digest}"
        elif token is not None:
            headers["X-Buildkite-Token"] = token
        async with self.http.post(
            f"{self.base}/buildkite/webhook", data=body, headers=headers
        ) as r:
            await r.read()
            return r

    def response_texts(self, name: str) -> list[str]:
        return [str(p.json.get("text", "")) for p in self.slack.responses if p.name == name]


@contextlib.asynccontextmanager
async def running_bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str | None,
    *,
    tuning: Tuning = FAST,
    **overrides: Any,
) -> AsyncIterator[BotClient]:
    """The bot, started against the fakes; `overrides` are settings, `tuning` its timings (by
    default without Slack pacing)."""
    settings = bot_settings(slack, bk, redis_url, **overrides)
    async with start_bot(settings, host="127.0.0.1", port=0, tuning=tuning) as bot:
        client = BotClient(bot, slack, bk, tuning)
        try:
            yield client
        finally:
            await client.close()


class BotLog:
    """What the bot's own logging set-up (`app.ops.logs.configure`) writes, as JSON lines."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream
        self.start = 0

    def mark(self) -> None:
        """Only lines written from now on count."""
        self.start = len(self.stream.getvalue())

    @property
    def text(self) -> str:
        return self.stream.getvalue()[self.start :]

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def at_least(self, level: int) -> list[dict[str, Any]]:
        return [e for e in self.entries() if logging.getLevelName(e["level"].upper()) >= level]

    def leaks(self, *values: str) -> list[str]:
        """Which of `values` and of the bots' secrets appear anywhere in the log (marked or not)."""
        whole = self.stream.getvalue()
        return [v for v in (*values, *SECRETS) if v and v in whole]


@contextlib.contextmanager
def bot_logging(level: str = "DEBUG") -> Iterator[BotLog]:
    """The bot's logging as `python -m app` sets it up, into a string; restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    stream = io.StringIO()
    logs.configure(level, SECRETS, stream)
    try:
        yield BotLog(stream)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name in list(logging.root.manager.loggerDict):
            logging.getLogger(name).setLevel(saved.get(name, logging.NOTSET))
