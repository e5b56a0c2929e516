"""The stale-block guard end to end: a newer build of the branch passes or is unblocked, and the
older blocked build's message, its Unblock, and (with `superseded: cancel`) the build itself
follow, once, through webhooks delivered twice and to two replicas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys

CHANNEL = "C0CHAN"
BUILDS = "/organizations/acme/pipelines/deploy-prod/builds"


def policy(mode: str | None) -> str:
    line = f"    superseded: {mode}\n" if mode else ""
    return f"pipelines:\n  deploy-prod:\n    deployers: [U0USER, U0BOB]\n{line}"


@pytest.fixture
def mode() -> str | None:
    return None


@pytest.fixture
def policy_file(tmp_path: Path, mode: str | None) -> Path:
    path = tmp_path / "policy.yml"
    path.write_text(policy(mode))
    return path


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, policy_file: Path
) -> AsyncIterator[BotClient]:
    slack.add_user("U0BOB", "bob", "bob@example.com")
    bk.add_pipeline("deploy-prod", block="Release", steps=("Test", "Deploy"))
    async with running_bot(slack, bk, redis_url, policy_file=str(policy_file)) as client:
        yield client


def roots(slack: FakeSlack) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if not c.args.get("thread_ts")]


def element(slack: FakeSlack, ts: str, action_id: str) -> dict[str, Any] | None:
    for block in slack.message(CHANNEL, ts)["blocks"]:
        for item in block.get("elements", []):
            if item.get("action_id") == action_id:
                return dict(item)
    return None


async def deploy(bot: BotClient) -> str:
    before = len(roots(bot.slack))
    await bot.command("/deploy", "deploy-prod")
    posts = await bot.slack.wait_for(lambda: len(roots(bot.slack)) > before and roots(bot.slack))
    assert posts
    return str(posts[-1].response["ts"])


async def move(bots: list[BotClient], number: int, state: str, **kwargs: Any) -> None:
    """Move build `number` in Buildkite, and deliver its webhook to every bot, twice."""
    bk = bots[0].bk
    bk.set_build_state("deploy-prod", number, state, **kwargs)
    payload = bk.webhook_payload("deploy-prod", number)
    for bot in bots:
        for _ in range(2):
            assert (await bot.webhook(payload)).status == 200
    for bot in bots:
        await bot.settled()


async def two_blocked_then_newer_passes(bot: BotClient) -> tuple[str, str, dict[str, Any]]:
    """#1 and #2 wait on their block step; #2 passes. Returns both messages and #1's Unblock."""
    first = await deploy(bot)
    await move([bot], 1, "passed", blocked=True)
    unblock = await bot.slack.wait_for(lambda: element(bot.slack, first, "build_unblock"))
    assert unblock is not None
    second = await deploy(bot)
    await move([bot], 2, "passed", blocked=True)
    await move([bot], 2, "passed")
    return first, second, unblock


async def test_a_superseded_block_loses_its_button_and_its_unblock_is_refused(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    first, _, unblock = await two_blocked_then_newer_passes(bot)
    shown = json.dumps(slack.message(CHANNEL, first)["blocks"])
    assert "Superseded by <https://buildkite.com/acme/deploy-prod/builds/2|#2>" in shown
    assert "unblocking this one is refused" in shown
    assert element(slack, first, "build_unblock") is None
    assert element(slack, first, "build_cancel") is not None  # still cancelable

    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=first)
    (text,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert (
        "`deploy-prod` #1 is superseded by <https://buildkite.com/acme/deploy-prod/builds/2|#2>"
        in (text)
    )
    assert "it is refused" in text
    assert [r for r in bk.requests_to("PUT") if r.path.endswith("/unblock")] == []

    build_id = bk.build("deploy-prod", 1)["id"]
    mark = json.loads(await redis_client.get(keys.SUPERSEDED_KEY.format(build_id=build_id)))
    assert (mark["number"], mark["mode"]) == (2, "refuse")
    assert (
        await redis_client.zcard(keys.BLOCKED_KEY.format(pipeline="deploy-prod", branch="main"))
        == 0
    )
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]
    assert {"action": "unblock", "outcome": "refused", "detail": "superseded by #2"}.items() <= (
        entries[-1].items()
    )


async def test_an_unblocked_newer_build_supersedes_too_and_a_newer_block_is_not_touched(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    first = await deploy(bot)
    await move([bot], 1, "passed", blocked=True)
    second = await deploy(bot)
    await move([bot], 2, "passed", blocked=True)
    unblock = await slack.wait_for(lambda: element(slack, second, "build_unblock"))
    assert unblock is not None
    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=second)
    assert "Unblocked" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    await bot.settled()
    await slack.wait_for(lambda: "Superseded by" in json.dumps(slack.message(CHANNEL, first)))
    # A build newer than the one that went further stays as it is.
    third = await deploy(bot)
    await move([bot], 3, "passed", blocked=True)
    assert await slack.wait_for(lambda: element(slack, third, "build_unblock"))
    assert "Superseded" not in json.dumps(slack.message(CHANNEL, third))


@pytest.mark.parametrize("mode", ["warn"])
async def test_with_warn_the_unblock_asks_to_confirm(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    first, _, unblock = await two_blocked_then_newer_passes(bot)
    anyway = element(slack, first, "build_unblock")
    assert anyway is not None and anyway["text"]["text"] == "Unblock anyway: Release"
    assert anyway["confirm"]["title"]["text"] == "Unblock a superseded build?"
    assert "superseded by #2" in anyway["confirm"]["text"]["text"]
    # The old button, without the confirmation, is sent to the one that asks.
    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=first)
    assert "*Unblock anyway*" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    assert [r for r in bk.requests_to("PUT") if r.path.endswith("/unblock")] == []
    _, name = await bot.click("build_unblock", anyway["value"], channel=CHANNEL, message_ts=first)
    assert "Unblocked *Release*" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    (put,) = [r for r in bk.requests_to("PUT") if r.path.endswith("/unblock")]
    assert BUILDS + "/1/jobs/" in put.path


@pytest.mark.parametrize("mode", ["cancel"])
async def test_with_cancel_the_bot_cancels_once_across_replicas_and_double_delivery(
    bot: BotClient,
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    policy_file: Path,
) -> None:
    first = await deploy(bot)
    # Blocked while a job still runs: Buildkite can cancel it (not one that has only the block
    # step left, which counts as finished).
    await move([bot], 1, "running", blocked=True)
    await deploy(bot)
    await move([bot], 2, "passed", blocked=True)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy_file)) as other:
        await move([bot, other], 2, "passed")
        await bot.settled()
        await other.settled()
    cancels = bk.requests_to("PUT", BUILDS + "/1/cancel")
    assert len(cancels) == 1
    assert bk.requests_to("PUT", BUILDS + "/2/cancel") == []
    replies = [c.args["text"] for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == first]
    told = [t for t in replies if "Canceled by the bot" in t]
    assert (
        len(told) == 1
        and "superseded by <https://buildkite.com/acme/deploy-prod/builds/2|#2>" in (told[0])
    )
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]
    guard = [e for e in entries if e["user"] == "stale-block guard"]
    assert [(e["action"], e["build"], e["detail"]) for e in guard] == [
        ("cancel", "1", "superseded by #2")
    ]


@pytest.mark.parametrize("mode", ["cancel"])
async def test_with_cancel_a_build_buildkite_will_not_cancel_stays_refused(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    first, _, unblock = await two_blocked_then_newer_passes(bot)
    assert len(bk.requests_to("PUT", BUILDS + "/1/cancel")) == 1  # answered 422: finished
    replies = [c.args["text"] for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == first]
    assert any("Buildkite cancels only a build that still runs" in t for t in replies)
    await slack.wait_for(
        lambda: "unblocking this one is refused" in json.dumps(slack.message(CHANNEL, first))
    )
    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=first)
    assert "it is refused" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]


@pytest.mark.parametrize("mode", ["cancel"])
async def test_with_cancel_a_refused_cancel_is_explained_and_the_unblock_still_refused(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    first = await deploy(bot)
    await move([bot], 1, "running", blocked=True)
    unblock = await slack.wait_for(lambda: element(slack, first, "build_unblock"))
    assert unblock is not None
    await deploy(bot)
    bk.fail_next(5, status=403, path_contains="/builds/1/cancel", method="PUT")
    await move([bot], 2, "passed")
    replies = [c.args["text"] for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == first]
    (told,) = [t for t in replies if "could not cancel it" in t]
    assert "It stays, and unblocking it is refused." in told
    assert bk.build("deploy-prod", 1)["state"] == "running"
    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=first)
    assert "it is refused" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
