"""One build per command, however slow Buildkite is (issue 13): a create or rebuild that may have
reached Buildkite is looked for, never sent again, and a build that shows up late is adopted.

Buildkite here takes longer to answer than the bot waits (a 3 s answer to a 1 s timeout), and
makes the build only as it answers: the bot's first look, a second after its timeout, misses it.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import redis.asyncio as redis

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage.keys import AUDIT_STREAM, AWAITED_DUE_KEY, AWAITED_KEY
from tests.waiting import wait_until

CHANNEL = "C0CHAN"
PIPELINE = "deploy-prod"
BUILDS = f"/v2/organizations/acme/pipelines/{PIPELINE}/builds"
#: The bot waits 1 s for an answer, then looks for the build for up to 10 s.
PATIENT: dict[str, Any] = {
    "buildkite_timeout": 1.0,
    "buildkite_start_patience": 10.0,
    "poll_interval": 0.5,
}
#: ...or for only 1 s, so that a build Buildkite makes after 4 s is not found in time.
IMPATIENT: dict[str, Any] = {
    "buildkite_timeout": 1.0,
    "buildkite_start_patience": 1.0,
    "poll_interval": 0.5,
}


def roots(slack: FakeSlack) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if not c.args.get("thread_ts")]


def replies(slack: FakeSlack, ts: str) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == ts]


def shown(slack: FakeSlack, ts: str) -> str:
    return json.dumps(slack.message(CHANNEL, ts)["blocks"])


def creates(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests if r.method == "POST" and r.path == BUILDS]


async def answered(bot: BotClient, slack: FakeSlack, name: str) -> str:
    """The deploy's answer after its "Starting…" acknowledgement."""
    texts = await slack.wait_for(lambda: bot.response_texts(name))
    return texts[-1]


async def finish(bot: BotClient, bk: FakeBuildkite, number: int) -> None:
    bk.set_build_state(PIPELINE, number, "passed")
    assert (await bot.webhook(bk.webhook_payload(PIPELINE, number))).status == 200


@pytest.fixture(autouse=True)
def pipeline(bk: FakeBuildkite) -> None:
    bk.add_pipeline(PIPELINE, default_branch="main")


async def test_a_deploy_answered_after_the_timeout_starts_one_build_and_follows_it(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: redis.Redis
) -> None:
    bk.answer_late_next(3.0, "/builds", method="POST")
    async with running_bot(slack, bk, redis_url, **PATIENT) as bot:
        resp, name, _ = await bot.command("/deploy", PIPELINE)
        assert resp.status == 200
        text = await answered(bot, slack, name)
        assert "Started" in text and f"{PIPELINE} #1" in text, text

        root = await slack.wait_for(lambda: roots(slack))
        ts = str(root[0].response["ts"])
        await finish(bot, bk, 1)
        await slack.wait_for(lambda: "Passed" in shown(slack, ts))
        await slack.wait_for(lambda: replies(slack, ts))

        # Nothing left to adopt: the build was found by the request itself.
        assert await redis_client.hlen(AWAITED_KEY) == 0
        assert len(bk.builds) == 1 and len(creates(bk)) == 1
        assert len(roots(slack)) == 1 and len(replies(slack, ts)) == 1
        assert "passed" in replies(slack, ts)[0].args["text"]
        assert bot.response_texts(name) == [text]  # one answer, about the one build


async def test_a_deploy_whose_build_appears_too_late_is_said_to_maybe_have_started_then_adopted(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: redis.Redis
) -> None:
    bk.answer_late_next(4.0, "/builds", method="POST")
    async with running_bot(slack, bk, redis_url, **IMPATIENT) as bot:
        resp, name, _ = await bot.command("/deploy", PIPELINE)
        assert resp.status == 200
        text = await answered(bot, slack, name)
        assert "may have started" in text and "did not send it again" in text, text
        assert f"https://buildkite.com/acme/{PIPELINE}/builds" in text
        assert bk.builds == []  # Buildkite is still making it
        awaited = cast(list[bytes], await redis_client.hkeys(AWAITED_KEY))
        (request_id,) = [i.decode() for i in awaited]
        stream = await redis_client.xrange(AUDIT_STREAM)
        audited = [fields for _, fields in cast(list[tuple[bytes, dict[bytes, bytes]]], stream)]
        assert [(f[b"action"], f[b"outcome"]) for f in audited] == [(b"deploy", b"unknown")]

        # The build appears; the poller finds it by its request id and follows it.
        build = await wait_until(
            lambda: bk.builds[0] if bk.builds else None, timeout=30, what="the late build"
        )
        assert build is not None
        assert build["meta_data"]["chatops_request_id"] == request_id
        root = await slack.wait_for(lambda: roots(slack))
        ts = str(root[0].response["ts"])
        assert f"{PIPELINE} #1" in root[0].args["text"]
        assert await redis_client.hlen(AWAITED_KEY) == 0
        assert await redis_client.zcard(AWAITED_DUE_KEY) == 0

        await finish(bot, bk, 1)
        await slack.wait_for(lambda: "Passed" in shown(slack, ts))
        await slack.wait_for(lambda: replies(slack, ts))

    assert len(bk.builds) == 1 and len(creates(bk)) == 1
    assert len(roots(slack)) == 1 and len(replies(slack, ts)) == 1
    assert "passed" in replies(slack, ts)[0].args["text"]


async def test_a_deploy_answered_5xx_is_not_sent_again(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: redis.Redis
) -> None:
    """A 502 says nothing of whether Buildkite took the create: looked for, not resent."""
    bk.fail_next(1, 502, method="POST")
    async with running_bot(slack, bk, redis_url, **IMPATIENT) as bot:
        _, name, _ = await bot.command("/deploy", PIPELINE)
        text = await answered(bot, slack, name)
    assert "may have started" in text, text
    assert len(creates(bk)) == 1 and bk.builds == []
    assert await redis_client.hlen(AWAITED_KEY) == 1  # still looked for by the poller


async def test_a_rebuild_answered_after_the_timeout_starts_one_rebuild(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: redis.Redis
) -> None:
    async with running_bot(slack, bk, redis_url, **PATIENT) as bot:
        _, name, _ = await bot.command("/deploy", PIPELINE)
        root = await slack.wait_for(lambda: roots(slack))
        ts = str(root[0].response["ts"])
        bk.set_build_state(PIPELINE, 1, "failed", failed_jobs=["Test"])
        assert (await bot.webhook(bk.webhook_payload(PIPELINE, 1))).status == 200
        await slack.wait_for(lambda: replies(slack, ts))

        bk.answer_late_next(3.0, "/rebuild", method="PUT")
        resp, name, _ = await bot.command("/rebuild", f"{PIPELINE} 1")
        assert resp.status == 200
        text = await answered(bot, slack, name)
        assert "Started" in text and f"{PIPELINE} #2" in text, text

        # The rebuild is followed in the original's thread, to its end.
        await slack.wait_for(
            lambda: any(f"{PIPELINE} #2" in str(c.args.get("text")) for c in replies(slack, ts))
        )
        await finish(bot, bk, 2)
        await slack.wait_for(
            lambda: any(
                "#2" in str(c.args["text"]) and "passed" in str(c.args["text"])
                for c in replies(slack, ts)
            )
        )
        assert await redis_client.hlen(AWAITED_KEY) == 0

    rebuilds = [r for r in bk.requests if r.method == "PUT" and r.path.endswith("/rebuild")]
    assert len(rebuilds) == 1
    assert len(bk.builds) == 2 and bk.builds[1]["rebuilt_from"]["number"] == 1


async def test_a_rebuild_that_appears_too_late_is_adopted_in_the_thread(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: redis.Redis
) -> None:
    async with running_bot(slack, bk, redis_url, **IMPATIENT) as bot:
        await bot.command("/deploy", PIPELINE)
        root = await slack.wait_for(lambda: roots(slack))
        ts = str(root[0].response["ts"])
        await finish(bot, bk, 1)
        await slack.wait_for(lambda: replies(slack, ts))

        bk.answer_late_next(4.0, "/rebuild", method="PUT")
        _, name, _ = await bot.command("/rebuild", f"{PIPELINE} 1")
        text = await answered(bot, slack, name)
        assert "may have started" in text and "rebuild of #1" in text, text

        await slack.wait_for(
            lambda: any(f"{PIPELINE} #2" in str(c.args.get("text")) for c in replies(slack, ts))
        )
        assert await redis_client.hlen(AWAITED_KEY) == 0
    rebuilds = [r for r in bk.requests if r.method == "PUT" and r.path.endswith("/rebuild")]
    assert len(rebuilds) == 1 and len(bk.builds) == 2
    assert len(roots(slack)) == 1
