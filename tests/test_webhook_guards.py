"""Buildkite webhooks an attacker (or a confused proxy) could send: a signed delivery replayed,
a stale one, and builds no real Buildkite describes. Each is answered without reaching the
tracker, the notifier or Buildkite, as seen by the fakes and in Redis.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import pytest
import redis.asyncio as redis

from app.simulators.bot import WEBHOOK_TOKEN, BotClient
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage.keys import EVENTS_STREAM, PREFIX

CHANNEL = "C0CHAN"


async def deploy(bot: BotClient) -> str:
    """/deploy deploy-prod, answered: build #1 followed in one message; returns its ts."""
    await bot.command("/deploy", "deploy-prod")
    (post,) = await bot.slack.wait_for(lambda: bot.slack.posts(CHANNEL))
    await bot.settled()  # the command's own answer too, before a test counts what follows
    return str(post.response["ts"])


def seen(bot: BotClient) -> tuple[int, int, int]:
    """Everything the bot has sent so far: Buildkite requests, Slack calls, response_url posts."""
    return len(bot.bk.requests), len(bot.slack.calls), len(bot.slack.responses)


async def transitions_recorded(client: redis.Redis) -> int:
    """State changes the tracker has ever recorded (the stream's entries are deleted once sent)."""
    if not await client.exists(EVENTS_STREAM):
        return 0
    return int((await client.xinfo_stream(EVENTS_STREAM))["entries-added"])


async def finished(slack: FakeSlack, ts: str) -> None:
    """Wait for the build's message to say Passed and its thread to have the final reply."""
    await slack.wait_for(
        lambda: (
            "Passed" in json.dumps(slack.message(CHANNEL, ts)["blocks"])
            and any("passed in" in str(reply.get("text")) for reply in slack.thread(CHANNEL, ts))
        )
    )


async def body(response: Any) -> Any:
    return json.loads(await response.text())


async def test_a_replayed_signed_webhook_does_nothing(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: redis.Redis
) -> None:
    ts = await deploy(bot)
    now = int(time.time())
    bk.set_build_state("deploy-prod", 1, "running")
    running = bk.webhook_payload("deploy-prod", 1)
    assert (await bot.webhook(running, signed=True, timestamp=now)).status == 200
    bk.set_build_state("deploy-prod", 1, "passed")
    passed = bk.webhook_payload("deploy-prod", 1)
    assert (await bot.webhook(passed, signed=True, timestamp=now)).status == 200
    await finished(slack, ts)
    before, transitions = seen(bot), await transitions_recorded(redis_client)

    # The same two deliveries again, byte for byte: the older state would otherwise make the
    # tracker ask Buildkite which state is true.
    for payload in (running, passed, running):
        replay = await bot.webhook(payload, signed=True, timestamp=now)
        assert replay.status == 200
        assert await body(replay) == {"ok": True, "duplicate": True}

    assert seen(bot) == before, bk.requests[before[0] :]
    assert await transitions_recorded(redis_client) == transitions
    keys = await redis_client.keys(f"{PREFIX}webhook:*")
    assert len(keys) == 2
    for key in keys:
        assert 0 < await redis_client.ttl(key) <= 660

    # Outside the signature's window the same kind of delivery is refused outright.
    for stale in (now - 400, now + 400):
        late = await bot.webhook(running, signed=True, timestamp=stale)
        assert late.status == 401
    assert seen(bot) == before

    # A new delivery (Buildkite signs each with its own time) is still read.
    fresh = await bot.webhook(passed, signed=True, timestamp=now + 1)
    assert await body(fresh) == {"ok": True, "changed": False}
    assert seen(bot) == before


async def test_a_token_mode_replay_cannot_undo_a_newer_state(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: redis.Redis
) -> None:
    # Token mode has no per-delivery identity to remember: a replay is read again. What holds
    # is the tracker's own order (never back to an earlier state, one message per change), at
    # the price of one Buildkite look-up per replayed older state. Signature mode avoids it.
    ts = await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "running")
    running = bk.webhook_payload("deploy-prod", 1)
    await bot.webhook(running)
    bk.set_build_state("deploy-prod", 1, "passed")
    await bot.webhook(bk.webhook_payload("deploy-prod", 1))
    await finished(slack, ts)
    requests, transitions = len(bk.requests), await transitions_recorded(redis_client)

    replay = await bot.webhook(running)

    assert await body(replay) == {"ok": True, "changed": False}
    assert [r.path for r in bk.requests[requests:]] == [
        f"/v2/organizations/{bk.org}/pipelines/deploy-prod/builds/1"
    ]
    assert await transitions_recorded(redis_client) == transitions
    assert "Passed" in json.dumps(slack.message(CHANNEL, ts)["blocks"])


def _set(path: str, value: Any) -> Any:
    def change(payload: dict[str, Any]) -> None:
        payload["build"][path] = value

    return change


def _other_org(payload: dict[str, Any]) -> None:
    build = payload["build"]
    build["url"] = build["url"].replace("/organizations/acme/", "/organizations/evil-corp/")
    build["web_url"] = build["web_url"].replace("buildkite.com/acme/", "buildkite.com/evil-corp/")


WEB = "https://buildkite.com/acme/deploy-prod/builds/1"
API = "https://api.buildkite.com/v2/organizations/acme/pipelines/deploy-prod/builds/1"
IMPOSSIBLE = {
    "a negative number": (_set("number", -1), "build number"),
    "number zero": (_set("number", 0), "build number"),
    "an absurd number": (_set("number", 10**9 + 1), "build number"),
    "a number as text": (_set("number", "1"), "build number"),
    "a fractional number": (_set("number", 1.5), "build number"),
    "a number that is true": (_set("number", True), "build number"),
    "an http web_url": (_set("web_url", WEB.replace("https:", "http:")), "web_url is not https"),
    "a web_url elsewhere": (
        _set("web_url", WEB.replace("buildkite.com", "evil.example")),
        "web_url is not on buildkite.com",
    ),
    "a look-alike host": (
        _set("web_url", WEB.replace("buildkite.com", "buildkite.com.evil.example")),
        "web_url is not on buildkite.com",
    ),
    "a userinfo trick": (
        _set("web_url", WEB.replace("https://", "https://buildkite.com@")),
        "web_url is not on buildkite.com",
    ),
    "a javascript web_url": (_set("web_url", "javascript:alert(1)"), "web_url is not https"),
    "a web_url of another build": (
        _set("web_url", WEB.replace("/builds/1", "/builds/7")),
        "build #7's, not #1's",
    ),
    "a web_url that is no build's": (
        _set("web_url", "https://buildkite.com/acme/deploy-prod"),
        "web_url is not a build's address",
    ),
    "an http url": (_set("url", API.replace("https:", "http:")), "url is not https"),
    "a url elsewhere": (
        _set("url", API.replace("api.buildkite.com", "api.evil.example")),
        "url is not on",
    ),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE), ids=list(IMPOSSIBLE))
@pytest.mark.parametrize("signed", [False, True], ids=["token", "signature"])
async def test_an_impossible_build_is_refused_with_one_warning(
    case: str,
    signed: bool,
    bot: BotClient,
    bk: FakeBuildkite,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    change, reason = IMPOSSIBLE[case]
    await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "passed")
    payload = copy.deepcopy(bk.webhook_payload("deploy-prod", 1))
    assert (payload["build"]["web_url"], payload["build"]["url"]) == (WEB, API)
    change(payload)
    before, transitions = seen(bot), await transitions_recorded(redis_client)
    caplog.set_level(logging.INFO)
    caplog.clear()

    response = await bot.webhook(payload, signed=signed)

    assert response.status == 400
    assert (await body(response))["error"].startswith(("impossible build", "bad payload"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert reason in warnings[0]
    assert seen(bot) == before
    assert await transitions_recorded(redis_client) == transitions
    tracked = await bot.services.store.get(bk.build("deploy-prod", 1)["id"])
    assert tracked is not None and tracked.phase != "passed"


async def test_another_organizations_build_is_ignored_with_one_warning(
    bot: BotClient, bk: FakeBuildkite, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "passed")
    payload = copy.deepcopy(bk.webhook_payload("deploy-prod", 1))
    _other_org(payload)
    before, transitions = seen(bot), await transitions_recorded(redis_client)
    caplog.set_level(logging.INFO)
    caplog.clear()

    response = await bot.webhook(payload, signed=True)

    assert response.status == 200
    assert await body(response) == {"ok": True, "ignored": "another organization's build"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["webhook build.finished refused: a build of organization 'evil-corp'"]
    assert seen(bot) == before
    assert await transitions_recorded(redis_client) == transitions


async def test_a_signed_delivery_that_could_not_be_recorded_counts_when_sent_again(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    ts = await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "passed")
    passed = bk.webhook_payload("deploy-prod", 1)
    now = int(time.time())
    router = bot.services.router
    on_build = router.on_build

    async def redis_down(*args: Any) -> None:
        monkeypatch.setattr(router, "on_build", on_build)
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(router, "on_build", redis_down)
    assert (await bot.webhook(passed, signed=True, timestamp=now)).status == 503

    again = await bot.webhook(passed, signed=True, timestamp=now)

    assert await body(again) == {"ok": True, "changed": True}
    await finished(slack, ts)


async def test_a_verified_body_nested_too_deeply_is_a_400_not_a_500(
    bot: BotClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"event": "build.finished", "a": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001
    before = seen(bot)
    headers = {"Content-Type": "application/json", "X-Buildkite-Token": WEBHOOK_TOKEN}
    with caplog.at_level(logging.WARNING):
        async with bot.http.post(f"{bot.base}/buildkite/webhook", data=body, headers=headers) as r:
            status = r.status
    assert status == 400
    assert seen(bot) == before
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "webhook payload rejected: Buildkite webhook payload not understood: "
        "body is nested too deeply"
    ]
