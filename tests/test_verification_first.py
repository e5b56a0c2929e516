"""Verification first: a request Slack did not sign is refused before anything reads it.

Each attack goes through the bot's real HTTP port. What counts is what reached the Slack and
Buildkite fakes (and an attacker's own server), the status, and what the bot's own logging set-up
wrote: one WARNING line, no body, no response_url, no secret.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from slack_bolt.middleware.request_verification.async_request_verification import (
    AsyncRequestVerification,
)
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, BotLog, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

#: What a request from someone who does not hold the signing secret carries in its body.
MARK = "attacker-mark-7f3a"


class Attacker:
    """A server of the attacker's own: records every request that reaches it, answers 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _record(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, await request.read()))
        return web.json_response({"ok": True})

    async def __aenter__(self) -> Attacker:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def attacker() -> AsyncIterator[Attacker]:
    async with Attacker() as server:
        yield server


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, bot_log: BotLog
) -> AsyncIterator[BotClient]:
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url) as client:
        yield client


class Outbound:
    """Every request the bot made to Slack or Buildkite from the moment of its creation on."""

    def __init__(self, slack: FakeSlack, bk: FakeBuildkite) -> None:
        self.slack, self.bk = slack, bk
        self.calls, self.responses, self.bk_requests = (
            len(slack.calls),
            len(slack.responses),
            len(bk.requests),
        )

    def since(self) -> list[str]:
        return (
            [f"slack {c.method}" for c in self.slack.calls[self.calls :]]
            + [f"response_url {p.name}" for p in self.slack.responses[self.responses :]]
            + [f"buildkite {r.method} {r.path}" for r in self.bk.requests[self.bk_requests :]]
        )


def _click_body(response_url: str) -> bytes:
    payload = slack_requests.block_action_payload(
        "build_cancel",
        json.dumps({"pipeline": "deploy-prod", "number": 1}),
        response_url=response_url,
        message_ts="1700000000.000100",
        user_name=MARK,
    )
    return urlencode({"payload": json.dumps(payload)}).encode()


def _command_body(response_url: str) -> bytes:
    fields = slack_requests.slash_command_payload(
        "/deploy", f"deploy-prod {MARK}", response_url=response_url
    )
    return urlencode(fields).encode()


def _unsigned(
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    content_type: str = slack_requests.FORM,
) -> dict[str, str]:
    headers = {"Content-Type": content_type}
    if timestamp is not None:
        headers["X-Slack-Request-Timestamp"] = timestamp
    if signature is not None:
        headers["X-Slack-Signature"] = signature
    return headers


def _forged(timestamp: str) -> str:
    """A signature in Slack's shape, made without the signing secret."""
    return slack_requests.signed_headers(
        b"guessed", signing_secret="guessed-secret", content_type="", timestamp=0
    )["X-Slack-Signature"]


def _headers_for(case: str, body: bytes) -> dict[str, str]:
    now = int(time.time())
    if case == "missing timestamp":
        return _unsigned(body, None, _forged("0"))
    if case == "missing signature":
        return _unsigned(body, str(now), None)
    if case == "stale timestamp":
        # Slack's own signature, replayed six minutes later.
        return slack_requests.signed_headers(
            body,
            signing_secret=SIGNING_SECRET,
            content_type=slack_requests.FORM,
            timestamp=now - 360,
        )
    if case == "bad signature":
        return slack_requests.signed_headers(
            body, signing_secret="guessed-secret", content_type=slack_requests.FORM
        )
    timestamp = {"abc": "abc", "1e9": "1e9", "1.5": "1.5", "empty": "", "spaces": f" {now} "}[case]
    return _unsigned(body, timestamp, _forged(timestamp))


UNVERIFIED = [
    "abc",
    "1e9",
    "1.5",
    "empty",
    "spaces",
    "missing timestamp",
    "missing signature",
    "stale timestamp",
    "bad signature",
]


@pytest.mark.parametrize("kind", ["block_actions", "slash command"])
@pytest.mark.parametrize("case", UNVERIFIED)
async def test_an_unverified_request_gets_401_one_warning_and_no_call_out(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog, case: str, kind: str
) -> None:
    # The response_url is one the fake would accept: only verification stands in the way.
    response_url = slack.response_url("attacker")
    body = _click_body(response_url) if kind == "block_actions" else _command_body(response_url)
    outbound = Outbound(slack, bk)
    bot_log.mark()

    resp = await bot.post_slack(body, _headers_for(case, body))

    assert resp.status == 401
    assert outbound.since() == []
    (warning,) = bot_log.at_least(logging.WARNING)
    assert warning["level"] == "warning" and "slack request refused" in warning["message"]
    assert len(warning["message"]) < 200
    assert bot_log.leaks(MARK, response_url, "/response/attacker") == []


def _signed(body: bytes, content_type: str = slack_requests.FORM) -> dict[str, str]:
    return slack_requests.signed_headers(
        body, signing_secret=SIGNING_SECRET, content_type=content_type
    )


MALFORMED: dict[str, tuple[bytes, str]] = {
    "not UTF-8": (b"payload=%7B%7D&user=\xff\xfe" + MARK.encode(), slack_requests.FORM),
    "payload not JSON": (urlencode({"payload": "{" + MARK}).encode(), slack_requests.FORM),
    "payload not an object": (urlencode({"payload": f'["{MARK}"]'}).encode(), slack_requests.FORM),
    "JSON body not an object": (f'"{MARK}"'.encode(), "application/json"),
    "JSON body broken": (b'{"type": "event_callback", "x": "' + MARK.encode(), "application/json"),
    "payload nested too deeply": (
        urlencode({"payload": '{"a":' * 50_000 + f'"{MARK}"' + "}" * 50_000}).encode(),
        slack_requests.FORM,
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_signed_malformed_body_gets_400_one_warning_and_no_call_out(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog, case: str
) -> None:
    body, content_type = MALFORMED[case]
    outbound = Outbound(slack, bk)
    bot_log.mark()

    resp = await bot.post_slack(body, _signed(body, content_type))

    assert resp.status == 400
    assert outbound.since() == []
    (warning,) = bot_log.at_least(logging.WARNING)
    assert "slack request rejected" in warning["message"]
    assert "Traceback" not in bot_log.text
    assert bot_log.leaks(MARK) == []


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_an_unsigned_malformed_body_gets_401(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog, case: str
) -> None:
    body, content_type = MALFORMED[case]
    outbound = Outbound(slack, bk)
    bot_log.mark()

    resp = await bot.post_slack(body, _unsigned(body, "abc", _forged("abc"), content_type))

    assert resp.status == 401
    assert outbound.since() == []
    (warning,) = bot_log.at_least(logging.WARNING)
    assert "slack request refused" in warning["message"]
    assert "Traceback" not in bot_log.text
    assert bot_log.leaks(MARK) == []


async def test_a_second_timestamp_header_is_refused(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog
) -> None:
    # Slack's signed request with a second, unparseable timestamp added on the way.
    response_url = slack.response_url("replayed")
    body = _click_body(response_url)
    headers = [*_signed(body).items(), ("X-Slack-Request-Timestamp", "abc")]
    outbound = Outbound(slack, bk)
    bot_log.mark()

    async with bot.http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        assert resp.status == 401
    assert outbound.since() == []
    assert len(bot_log.at_least(logging.WARNING)) == 1
    assert bot_log.leaks(response_url) == []


async def test_fifty_unsigned_megabyte_posts_add_fifty_short_lines(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog
) -> None:
    body = b"payload=" + (MARK.encode() * (1024 * 1024 // len(MARK)))[: 1024 * 1024 - 100]
    outbound = Outbound(slack, bk)
    bot_log.mark()

    for _ in range(50):
        resp = await bot.post_slack(body, _unsigned(body, str(int(time.time())), "v0=00"))
        assert resp.status == 401

    assert outbound.since() == []
    assert len(bot_log.at_least(logging.WARNING)) == 50
    # One WARNING and one access-log line (failed requests only) per post, and nothing else
    # (but the bot's own DEBUG lines, about its Redis connections).
    assert len(bot_log.at_least(logging.INFO)) == 100
    assert len(bot_log.text) < 50 * 1000
    assert bot_log.leaks(MARK) == []


async def test_bolts_own_verification_logs_no_body(bot_log: BotLog) -> None:
    # Bolt's check still runs in Socket Mode (over HTTP the route's check replaces it), and it
    # logs the whole body of a request it refuses.
    body = f"text={MARK}&response_url=https://hooks.slack.com/commands/T1/2/{MARK}"
    verification = AsyncRequestVerification(SIGNING_SECRET, logging.getLogger("slack_bolt"))
    request = AsyncBoltRequest(body=body, headers={"x-slack-request-timestamp": "0"})

    async def next_() -> BoltResponse:
        raise AssertionError("an unsigned request passed Bolt's verification")

    bot_log.mark()
    resp = await verification.async_process(req=request, resp=BoltResponse(status=200), next=next_)

    assert resp.status == 401
    assert bot_log.leaks(MARK) == []
    assert [e["message"] for e in bot_log.entries()] in (
        [],
        ["Invalid request signature detected (body not logged)"],
    )


async def test_an_answer_for_a_foreign_response_url_goes_by_chat_post_ephemeral(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog, attacker: Attacker
) -> None:
    foreign = f"{attacker.url}/commands/T0001/1/{MARK}"
    body, headers = slack_requests.slash_command(
        "/deploy", "locks", response_url=foreign, signing_secret=SIGNING_SECRET
    )
    bot_log.mark()

    resp = await bot.post_slack(body, headers)
    assert resp.status == 200

    (answer,) = await slack.wait_for(lambda: slack.calls_to("chat.postEphemeral"))
    assert answer.args["channel"] == "C0CHAN" and answer.args["user"] == "U0USER"
    assert "lock" in answer.args["text"].lower()
    assert attacker.requests == []
    assert slack.responses == []
    (warning,) = bot_log.at_least(logging.WARNING)
    assert "SLACK_HOOKS_URL" in warning["message"]
    assert bot_log.leaks(MARK, attacker.url) == []


async def test_a_foreign_response_url_is_never_posted_to_later(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog, attacker: Attacker
) -> None:
    # The build's message cannot be posted: the bot would tell the requester by the command's
    # response_url. With one outside SLACK_HOOKS_URL, that hint is dropped, not sent.
    slack.fail_next("chat.postMessage", error="not_in_channel", n=1)
    foreign = f"{attacker.url}/commands/T0001/2/{MARK}"
    body, headers = slack_requests.slash_command(
        "/deploy", "deploy-prod", response_url=foreign, signing_secret=SIGNING_SECRET
    )
    resp = await bot.post_slack(body, headers)
    assert resp.status == 200

    await slack.wait_for(
        lambda: [
            e
            for e in bot_log.entries()
            if "SLACK_HOOKS_URL" in e["message"] and "not sent" in e["message"]
        ]
    )
    assert attacker.requests == []
    assert slack.responses == []
    assert len(bk.requests_to("POST")) == 1
    assert bot_log.leaks(MARK, attacker.url) == []


async def test_a_verified_request_bolt_fails_on_is_still_answered(
    bot: BotClient, slack: FakeSlack, bot_log: BotLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failure in Bolt's own middleware (before any listener) reaches the app's error handler:
    # for a verified request it answers the person, through the allowed response_url.
    from slack_bolt.middleware.authorization.async_single_team_authorization import (
        AsyncSingleTeamAuthorization,
    )

    async def broken(self: Any, **kwargs: Any) -> BoltResponse:
        raise RuntimeError(f"authorization broke {MARK}")

    monkeypatch.setattr(AsyncSingleTeamAuthorization, "async_process", broken)
    resp, name, _ = await bot.command("/deploy", "locks")

    assert resp.status == 500
    (text,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert "Something went wrong on the bot's side" in text
    response_url = slack.response_url(name)
    assert bot_log.leaks(response_url) == []


async def test_socket_mode_requests_are_not_checked_for_a_signature(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, bot_log: BotLog
) -> None:
    # Slack's websocket is authenticated by the app token; its envelopes carry no signature.
    async with running_bot(slack, bk, redis_url, slack_app_token=slack.app_token):
        await slack.wait_socket_connected(timeout=10)
        name = "socket-locks"
        await slack.socket_send(
            "slash_commands",
            slack_requests.slash_command_payload(
                "/deploy", "locks", response_url=slack.response_url(name)
            ),
        )
        await slack.wait_for(lambda: [p for p in slack.responses if p.name == name])
    assert [e for e in bot_log.at_least(logging.WARNING) if "refused" in e["message"]] == []


async def test_bolts_unhandled_request_line_quotes_nothing_of_the_body(
    bot: BotClient, slack: FakeSlack, bot_log: BotLog
) -> None:
    # A signed click on a button no listener knows: Bolt warns, quoting parts of the body.
    payload = slack_requests.block_action_payload(
        f"unknown_{MARK}", "1", response_url=slack.response_url("u"), message_ts="1.000100"
    )
    body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
    bot_log.mark()

    resp = await bot.post_slack(body, headers)

    assert resp.status == 404
    lines = [e["message"] for e in bot_log.at_least(logging.WARNING)]
    assert lines == ["Unhandled request (body not logged)"]
    assert bot_log.leaks(MARK) == []


async def test_slack_sdk_debug_lines_are_dropped_even_at_debug(
    bot: BotClient, slack: FakeSlack, bot_log: BotLog
) -> None:
    # slack_sdk's DEBUG lines name the response_url and quote the body of every post to it.
    # Whatever level its loggers end up at, none of them reaches the log.
    logging.getLogger("slack_sdk").setLevel(logging.DEBUG)
    bot_log.mark()

    _, name, _ = await bot.command("/deploy", "locks")
    await slack.wait_for(lambda: bot.response_texts(name))

    assert [e for e in bot_log.entries() if e["logger"].startswith("slack_sdk")] == []
    assert bot_log.leaks(slack.response_url(name)) == []


async def test_bolts_error_handler_never_answers_a_request_not_verified_first(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, bot_log: BotLog
) -> None:
    # Should a request ever reach Bolt without the route's check (a new route, another
    # adapter), the app's gate (`OnlyVerified`) fails it with an exception: its error handler
    # must stay silent rather than answer the body's response_url.
    response_url = slack.response_url("bypass")
    body = _command_body(response_url).decode()
    request = AsyncBoltRequest(
        body=body,
        headers={
            "content-type": slack_requests.FORM,
            "x-slack-request-timestamp": "abc",
            "x-slack-signature": _forged("abc"),
        },
    )
    outbound = Outbound(slack, bk)

    resp = await bot.bot.bolt.async_dispatch(request)

    assert resp.status == 500
    assert outbound.since() == []
    assert any("not answered" in e["message"] for e in bot_log.at_least(logging.WARNING))
