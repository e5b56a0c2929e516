"""The deploy loop end to end: signed Slack requests and webhooks in, Slack and Buildkite calls out.

Every test runs the real bot on a real port, against the Slack and Buildkite fakes and a real
Redis, and asserts on what reached the fakes and what was left in Redis.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace
from typing import Any

import pytest

from app.simulators import slack_requests
from app.simulators.bot import BotClient, bot_logging, running_bot, work_requests
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import RedisServer
from app.simulators.slack import FakeSlack
from app.slack.mrkdwn import escape
from app.slack.render.common import clip
from app.storage import keys
from app.storage.store import Store
from app.tracking.phases import phase_of, snapshot
from app.tuning import DEFAULT
from buildkite.models import Build
from tests.waiting import wait_until

CHANNEL = "C0CHAN"
USER = "U0USER"
BUILDS = "/v2/organizations/acme/pipelines/deploy-prod/builds"


# -- helpers reading what reached the fakes --------------------------------------------------


def roots(slack: FakeSlack) -> list[Any]:
    """Build messages posted at the top of the channel (not thread replies)."""
    return [c for c in slack.posts(CHANNEL) if not c.args.get("thread_ts")]


def replies(slack: FakeSlack, thread_ts: str) -> list[Any]:
    return [c for c in slack.posts(CHANNEL) if c.args.get("thread_ts") == thread_ts]


def blocks_text(blocks: list[dict[str, Any]]) -> str:
    return json.dumps(blocks)


def buttons(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {}
    for block in blocks:
        for element in block.get("elements", []):
            if element.get("type") == "button":
                found[element["action_id"]] = element
    return found


def creates(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests if r.method == "POST" and r.path == BUILDS]


async def deploy(bot: BotClient, text: str = "deploy-prod", **kwargs: Any) -> str:
    """/deploy and wait for the build message; returns its ts."""
    resp, _, ack = await bot.command("/deploy", text, **kwargs)
    assert resp.status == 200
    assert "Starting a build of `deploy-prod`" in ack["text"]
    call = await bot.slack.wait_for(lambda: roots(bot.slack)[-1] if roots(bot.slack) else None)
    assert call is not None
    return str(call.response["ts"])


async def send_state(bot: BotClient, state: str, number: int = 1, **kwargs: Any) -> None:
    bot.bk.set_build_state("deploy-prod", number, state, **kwargs)
    resp = await bot.webhook(bot.bk.webhook_payload("deploy-prod", number))
    assert resp.status == 200


def current(slack: FakeSlack, ts: str) -> dict[str, Any]:
    return slack.message(CHANNEL, ts)


# -- the happy paths ----------------------------------------------------------------------------


async def test_deploy_posts_one_message_and_follows_it_to_passed(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot, "deploy-prod main abc1234 Manual deploy from Slack DRY_RUN=1")

    (create,) = creates(bk)
    assert create.json["branch"] == "main"
    assert create.json["commit"] == "abc1234"
    assert create.json["message"] == "Manual deploy from Slack"
    assert create.json["env"] == {"DRY_RUN": "1"}
    assert create.json["meta_data"]["chatops_source"] == "slack"
    assert len(create.json["meta_data"]["chatops_request_id"]) >= 16
    assert create.headers["Authorization"] == "Bearer bk-test-token"

    root = roots(slack)[0]
    text = blocks_text(root.args["blocks"])
    for expected in (
        "deploy-prod #1",
        "Scheduled",
        "`main`",
        "`abc1234`",
        f"<@{USER}>",
        "https://buildkite.com/acme/deploy-prod/builds/1",
    ):
        assert expected in text
    assert set(buttons(root.args["blocks"])) == {"build_cancel", "build_open"}
    assert (
        buttons(root.args["blocks"])["build_open"]["url"]
        == "https://buildkite.com/acme/deploy-prod/builds/1"
    )

    await send_state(bot, "running")
    await slack.wait_for(lambda: "Running" in blocks_text(current(slack, ts)["blocks"]))
    await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
    assert "started running" in replies(slack, ts)[0].args["text"]

    await send_state(bot, "passed")
    await slack.wait_for(lambda: len(replies(slack, ts)) == 2)
    final = replies(slack, ts)[1].args
    assert f"<@{USER}>" in final["text"] and "passed" in final["text"]
    assert not final.get("reply_broadcast")
    message = current(slack, ts)
    assert "Passed" in blocks_text(message["blocks"])
    assert set(buttons(message["blocks"])) == {"build_rebuild", "build_open"}
    # Exactly one build message, updated in place, and nothing else in the channel.
    assert len(roots(slack)) == 1
    assert len(slack.posts(CHANNEL)) == 3
    # Tracking is over: the build left the pending set and its record expires.
    assert await bot.services.store.pending() == []
    build_id = bk.build("deploy-prod", 1)["id"]
    assert (
        0 < await bot.services.redis.ttl(keys.BUILD_KEY.format(build_id=build_id)) <= keys.FINAL_TTL
    )


async def test_deploy_defaults_branch_commit_and_message(bot: BotClient, bk: FakeBuildkite) -> None:
    bk.add_pipeline("web", default_branch="trunk")
    resp, _, _ack = await bot.command("/deploy", "web", user_name="alice")
    assert resp.status == 200
    await bot.slack.wait_for(lambda: creates_for(bk, "web"))
    body = creates_for(bk, "web")[0].json
    assert body["branch"] == "trunk"
    assert body["commit"] == "HEAD"
    assert body["message"] == "Deployed from Slack by @alice"
    assert "env" not in body or body["env"] in ({}, None)


def creates_for(bk: FakeBuildkite, slug: str) -> list[Any]:
    path = f"/v2/organizations/acme/pipelines/{slug}/builds"
    return [r for r in bk.requests if r.method == "POST" and r.path == path]


async def test_failing_then_failed_names_failed_jobs_and_broadcasts(
    bot: BotClient, slack: FakeSlack
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "running")
    await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
    await send_state(bot, "failing", failed_jobs=["Test"])
    await slack.wait_for(lambda: len(replies(slack, ts)) == 2)
    assert "is failing" in replies(slack, ts)[1].args["text"]

    await send_state(bot, "failed", failed_jobs=["Test"])
    await slack.wait_for(lambda: len(replies(slack, ts)) == 3)
    final = replies(slack, ts)[2].args
    assert final["reply_broadcast"] is True
    assert f"<@{USER}>" in final["text"] and "failed" in final["text"]
    assert "Failed jobs" in final["text"] and "Test" in final["text"]
    assert "|Test>" in final["text"]  # a link to the job
    assert "Deploy" not in final["text"].split("Failed jobs")[1]
    # Only the failure was broadcast.
    assert [c.args.get("reply_broadcast") for c in replies(slack, ts)] == [None, None, True]


async def test_blocked_build_says_so_and_is_not_final(bot: BotClient, slack: FakeSlack) -> None:
    ts = await deploy(bot)
    await send_state(bot, "passed", blocked=True)
    await slack.wait_for(
        lambda: "Waiting on a block step" in blocks_text(current(slack, ts)["blocks"])
    )
    assert "build_cancel" in buttons(current(slack, ts)["blocks"])
    await bot.settled()  # a reply would have been posted by now
    assert replies(slack, ts) == []  # not final, no thread reply
    assert len(await bot.services.store.pending()) == 1


# -- cancel and rebuild ------------------------------------------------------------------------


async def test_cancel_command_cancels_and_updates_the_message(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    resp, name, _ack = await bot.command("/cancel", "deploy-prod 1")
    assert resp.status == 200
    await slack.wait_for(lambda: any("Cancel requested" in t for t in bot.response_texts(name)))
    assert [r.path for r in bk.requests if r.method == "PUT"] == [f"{BUILDS}/1/cancel"]
    await slack.wait_for(lambda: "Canceled" in blocks_text(current(slack, ts)["blocks"]))
    await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
    assert "canceled" in replies(slack, ts)[0].args["text"]


async def test_cancel_accepts_a_pasted_build_url(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await deploy(bot)
    _resp, name, _ = await bot.command(
        "/cancel", "<https://buildkite.com/acme/deploy-prod/builds/1>"
    )
    await slack.wait_for(lambda: any("Cancel requested" in t for t in bot.response_texts(name)))
    assert [r.path for r in bk.requests if r.method == "PUT"] == [f"{BUILDS}/1/cancel"]


async def test_cancel_button_cancels_answers_the_clicker_and_updates(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    cancel = buttons(current(slack, ts)["blocks"])["build_cancel"]
    resp, name = await bot.click(
        "build_cancel", cancel["value"], channel=CHANNEL, message_ts=ts, user_id="U0BOB"
    )
    assert resp.status == 200
    await slack.wait_for(lambda: any("Cancel requested" in t for t in bot.response_texts(name)))
    assert [r.path for r in bk.requests if r.method == "PUT"] == [f"{BUILDS}/1/cancel"]
    await slack.wait_for(lambda: "Canceled" in blocks_text(current(slack, ts)["blocks"]))


async def test_double_click_on_cancel_cancels_once(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    value = buttons(current(slack, ts)["blocks"])["build_cancel"]["value"]
    _, first = await bot.click("build_cancel", value, channel=CHANNEL, message_ts=ts)
    _, second = await bot.click("build_cancel", value, channel=CHANNEL, message_ts=ts)
    await slack.wait_for(lambda: bot.response_texts(first) and bot.response_texts(second))
    assert len([r for r in bk.requests if r.method == "PUT"]) == 1
    assert any("already asked" in t for t in bot.response_texts(first) + bot.response_texts(second))


async def test_rebuild_command_starts_a_tracked_message_in_the_same_thread(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "failed", failed_jobs=["Test"])
    await slack.wait_for(lambda: len(replies(slack, ts)) == 1)

    _resp, _, ack = await bot.command("/rebuild", "deploy-prod 1")
    assert "Rebuilding `deploy-prod` #1" in ack["text"]
    await slack.wait_for(
        lambda: any(
            "deploy-prod #2" in blocks_text(c.args.get("blocks", [])) for c in replies(slack, ts)
        )
    )
    assert [r.path for r in bk.requests if r.method == "PUT"] == [f"{BUILDS}/1/rebuild"]
    new_root = next(
        c for c in replies(slack, ts) if "deploy-prod #2" in blocks_text(c.args.get("blocks", []))
    )
    new_ts = new_root.response["ts"]

    # The new build is followed too; its replies stay in the original thread.
    await send_state(bot, "passed", number=2)
    await slack.wait_for(lambda: "Passed" in blocks_text(current(slack, new_ts)["blocks"]))
    await slack.wait_for(
        lambda: any(
            "#2" in c.args["text"] and "passed" in c.args["text"] for c in replies(slack, ts)
        )
    )
    assert len(roots(slack)) == 1


async def test_rebuild_button_rebuilds_once_and_threads_the_new_build(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "passed")
    await slack.wait_for(lambda: "build_rebuild" in buttons(current(slack, ts)["blocks"]))
    value = buttons(current(slack, ts)["blocks"])["build_rebuild"]["value"]
    _, first = await bot.click("build_rebuild", value, channel=CHANNEL, message_ts=ts)
    _, second = await bot.click(
        "build_rebuild", value, channel=CHANNEL, message_ts=ts, user_id="U0BOB"
    )
    await slack.wait_for(lambda: any("Rebuild started" in t for t in bot.response_texts(first)))
    await slack.wait_for(lambda: bot.response_texts(second))
    assert f"<@{USER}> already asked" in bot.response_texts(second)[0]
    assert [r.path for r in bk.requests if r.method == "PUT"] == [f"{BUILDS}/1/rebuild"]
    await slack.wait_for(
        lambda: any(
            "deploy-prod #2" in blocks_text(c.args.get("blocks", [])) for c in replies(slack, ts)
        )
    )


async def test_open_in_buildkite_button_is_acknowledged(bot: BotClient, slack: FakeSlack) -> None:
    ts = await deploy(bot)
    resp, name = await bot.click(
        "build_open", None, channel=CHANNEL, message_ts=ts, message=current(slack, ts)
    )
    assert resp.status == 200
    await asyncio.sleep(0.2)
    assert bot.response_texts(name) == []  # a link button needs no answer beyond the ack


# -- duplicates and verification ---------------------------------------------------------------


async def test_duplicate_delivery_of_one_command_creates_one_build(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    from app.simulators import slack_requests
    from app.simulators.bot import SIGNING_SECRET

    body, headers = slack_requests.slash_command(
        "/deploy",
        "deploy-prod",
        response_url=slack.response_url("dup"),
        signing_secret=SIGNING_SECRET,
    )
    first = await bot.post_slack(body, headers)
    second = await bot.post_slack(body, headers)
    assert first.status == second.status == 200
    await slack.wait_for(lambda: roots(slack))
    await slack.wait_for(lambda: any("already asked" in t for t in bot.response_texts("dup")))
    assert len(creates(bk)) == 1
    assert len(bk.builds_of("deploy-prod")) == 1


async def test_bad_signature_is_rejected_and_starts_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    from app.simulators import slack_requests

    body, headers = slack_requests.slash_command(
        "/deploy",
        "deploy-prod",
        response_url=slack.response_url("x"),
        signing_secret="wrong-secret",
    )
    resp = await bot.post_slack(body, headers)
    assert resp.status == 401
    stale_body, stale_headers = slack_requests.slash_command(
        "/deploy",
        "deploy-prod",
        response_url=slack.response_url("y"),
        signing_secret="test-signing-secret",
        timestamp=1_600_000_000,
    )
    assert (await bot.post_slack(stale_body, stale_headers)).status == 401
    assert work_requests(bk) == []
    assert slack.posts() == []


async def test_webhook_with_bad_token_is_rejected_and_changes_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "passed")
    payload = bk.webhook_payload("deploy-prod", 1)
    assert (await bot.webhook(payload, token="not-the-token")).status == 401
    assert (await bot.webhook(payload, token=None)).status == 401
    assert (await bot.webhook(payload, token="not-the-token", signed=True)).status == 401
    assert replies(slack, ts) == []
    tracked = await bot.services.store.get(bk.build("deploy-prod", 1)["id"])
    assert tracked is not None
    assert tracked.phase == "scheduled"
    # A correctly signed one is accepted.
    assert (await bot.webhook(payload, signed=True)).status == 200
    await slack.wait_for(lambda: len(replies(slack, ts)) == 1)


async def test_webhook_for_an_untracked_build_changes_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    bk.add_build("deploy-prod", state="passed")  # started outside the bot
    resp = await bot.webhook(bk.webhook_payload("deploy-prod", 1))
    assert resp.status == 200
    info = (
        await redis_client.xinfo_stream(keys.EVENTS_STREAM)
        if await redis_client.exists(keys.EVENTS_STREAM)
        else {"entries-added": 0}
    )
    assert info["entries-added"] == 0
    assert slack.posts() == []


# -- polling and restarts -----------------------------------------------------------------------


async def test_lost_webhook_is_covered_by_polling(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url, poll_interval=0.5) as bot:
        ts = await deploy(bot)
        bk.set_build_state("deploy-prod", 1, "passed")  # and no webhook is sent
        await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
    assert "passed" in replies(slack, ts)[0].args["text"]
    polls = [r for r in bk.requests if r.method == "GET" and r.path.endswith("/builds")]
    # Org-wide lists of the bot's own builds, never a GET per build.
    assert polls
    assert {r.path for r in polls} == {"/v2/organizations/acme/builds"}
    assert not [r for r in bk.requests if r.path.endswith("/builds/1")]
    for request in polls:
        assert request.param("meta_data[chatops_source]") == "slack"
        assert request.param("exclude_jobs") == "true"
        assert request.param("per_page") == "100"
    states = next(r.params("state[]") for r in polls if r.params("state[]"))
    assert {"scheduled", "running", "failing", "canceling"} <= set(states)
    assert any(r.param("finished_from") for r in polls)


async def test_restart_mid_build_posts_the_final_state_once(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url, poll_interval=0.5) as first:
        ts = await deploy(first)
    # The bot is down while the build finishes; its webhook is lost.
    bk.set_build_state("deploy-prod", 1, "passed")
    async with running_bot(slack, bk, redis_url, poll_interval=0.5) as second:
        await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
        # A late webhook and more polls change nothing.
        await second.webhook(bk.webhook_payload("deploy-prod", 1))
        await second.services.poller.poll_once()
        await second.settled()
    async with running_bot(slack, bk, redis_url) as third:
        await third.webhook(bk.webhook_payload("deploy-prod", 1))
        await third.settled()
    assert len(replies(slack, ts)) == 1
    assert len(roots(slack)) == 1
    assert await redis_client.zcard(keys.PENDING_KEY) == 0


async def test_a_transition_left_unposted_by_a_dead_process_is_posted_after_restart(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
) -> None:
    """A process recorded a change, then died before posting it: another one posts it."""
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url) as first:
        ts = await deploy(first)
    # What the dead process did: record the final state, and read the transition it emitted.
    store = Store(redis_client)
    build = Build.model_validate(bk.set_build_state("deploy-prod", 1, "passed"))
    phase, rank = phase_of(build)
    await store.observe(
        build.id, phase=phase, rank=rank, snapshot=snapshot(build), final=True, blocked=False
    )
    dead = await store.read_transitions("dead-consumer", block_ms=10)
    assert [t.new for t in dead] == ["passed"]
    assert replies(slack, ts) == []

    await asyncio.sleep(0.3)
    quick = replace(DEFAULT, tracking=replace(DEFAULT.tracking, reclaim_idle_ms=200))
    async with running_bot(slack, bk, redis_url, tuning=quick):
        await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
    assert "passed" in replies(slack, ts)[0].args["text"]
    assert await redis_client.xlen(keys.EVENTS_STREAM) == 0


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text", "expected"),
    [
        ("/deploy", "", "*Usage:* `/deploy"),
        ("/deploy", "help", "*Usage:* `/deploy"),
        ("/cancel", "", "*Usage:* `/cancel"),
        ("/rebuild", "help", "*Usage:* `/rebuild"),
        ("/deploy", "deploy-prod main abc12", "`abc12` is not a commit"),
        ("/deploy", "Deploy_Prod", "is not a pipeline slug"),
        ("/deploy", "deploy-prod feature..x", "is not a valid branch name"),
        ("/cancel", "deploy-prod", "Expected a pipeline and a build number"),
        ("/cancel", "deploy-prod twelve", "is not a build number"),
        (
            "/rebuild",
            "https://buildkite.com/other-org/deploy-prod/builds/3",
            "organisation `other-org`",
        ),
        ("/rebuild", "https://example.com/acme/x", "is not a Buildkite build URL"),
    ],
)
async def test_typos_get_an_ephemeral_usage_answer_and_trigger_nothing(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, command: str, text: str, expected: str
) -> None:
    resp, _, ack = await bot.command(command, text)
    assert resp.status == 200
    assert expected in ack["text"]
    assert ack.get("response_type", "ephemeral") == "ephemeral"
    assert work_requests(bk) == []
    assert slack.posts() == []


async def _answer(bot: BotClient, command: str, text: str) -> str:
    _, name, _ = await bot.command(command, text)
    texts = await bot.slack.wait_for(lambda: bot.response_texts(name))
    return texts[-1]


async def test_unknown_pipeline_is_explained(bot: BotClient, slack: FakeSlack) -> None:
    text = await _answer(bot, "/deploy", "no-such-pipeline")
    assert "Pipeline `no-such-pipeline` was not found" in text
    assert slack.posts() == []


async def test_missing_build_is_explained(bot: BotClient) -> None:
    text = await _answer(bot, "/cancel", "deploy-prod 99")
    assert "Build #99 of pipeline `deploy-prod` was not found" in text


async def test_cancel_of_a_finished_build_is_explained(bot: BotClient, slack: FakeSlack) -> None:
    await deploy(bot)
    bot.bk.set_build_state("deploy-prod", 1, "passed")
    text = await _answer(bot, "/cancel", "deploy-prod 1")
    assert "already finished (passed)" in text


async def test_missing_scope_is_named(bot: BotClient, bk: FakeBuildkite, slack: FakeSlack) -> None:
    bk.scopes.remove("write_builds")
    text = await _answer(bot, "/deploy", "deploy-prod")
    assert "lacks the `write_builds` scope" in text
    assert slack.posts() == []


async def test_rejected_token_is_explained(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod")
    async with running_bot(slack, bk, redis_url, buildkite_api_token="wrong-token") as bot:
        text = await _answer(bot, "/deploy", "deploy-prod")
    assert "rejected the bot's API token (401)" in text
    assert "wrong-token" not in text


async def test_validation_failure_gives_the_reason(bot: BotClient, bk: FakeBuildkite) -> None:
    bk.fail_next(1, status=422, path_contains="/builds")
    text = await _answer(bot, "/deploy", "deploy-prod")
    assert "Buildkite refused to deploy `deploy-prod`" in text


async def test_buildkite_down_is_explained_and_nothing_is_tracked(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.fail_next(20, status=503)
    text = await _answer(bot, "/deploy", "deploy-prod")
    assert "Buildkite is not answering right now" in text
    assert await bot.services.store.pending() == []
    assert slack.posts() == []


async def test_redis_down_refuses_clearly_and_starts_nothing(
    slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("deploy-prod")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with running_bot(slack, bk, f"redis://127.0.0.1:{dead_port}/0") as bot:
        text = await _answer(bot, "/deploy", "deploy-prod")
        health = await bot.http.get(f"{bot.base}/healthz")
        assert health.status == 200
    assert "Tracking is unavailable right now" in text
    assert "nothing was started" in text
    assert bk.requests_to("POST") == []


async def test_no_secret_reaches_the_logs(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    # Through the bot's own logging set-up at DEBUG: no token, no signing secret and no
    # response_url (a live credential for the channel) in any line.
    bk.add_pipeline("deploy-prod", default_branch="main")
    with bot_logging("DEBUG") as log:
        async with running_bot(slack, bk, redis_url) as bot:
            ts = await deploy(bot)
            await send_state(bot, "failed", failed_jobs=["Test"])
            await slack.wait_for(lambda: replies(slack, ts))
            await bot.webhook(bot.bk.webhook_payload("deploy-prod", 1), token="wrong-token")
            await _answer(bot, "/cancel", "deploy-prod 1")
            unsigned, _ = slack_requests.slash_command(
                "/deploy", "deploy-prod", response_url=slack.response_url("x"), signing_secret="?"
            )
            await bot.post_slack(unsigned, {"X-Slack-Request-Timestamp": "abc"})
    assert "webhook refused" in log.text and "slack request refused" in log.text
    assert slack.responses, "the test used response_urls"
    assert log.leaks(slack.hooks_url) == []


async def test_an_unexpected_error_gives_a_reference_not_a_traceback(
    bot: BotClient,
    bk: FakeBuildkite,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bot.services.buildkite, "get_pipeline", broken)
    text = await _answer(bot, "/deploy", "deploy-prod")
    ref = text.split("ref `")[1].split("`")[0]
    assert "Something went wrong on the bot's side" in text and "Traceback" not in text
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)


async def test_the_bot_recovers_when_redis_comes_back(slack: FakeSlack, bk: FakeBuildkite) -> None:
    bk.add_pipeline("deploy-prod")
    server = RedisServer()  # not started yet: Redis is down when the bot starts
    try:
        async with running_bot(slack, bk, server.url) as bot:
            down = await _answer(bot, "/deploy", "deploy-prod")
            assert "Tracking is unavailable right now" in down
            server.start()
            up = await _answer(bot, "/deploy", "deploy-prod")
            assert "Started" in up
            await slack.wait_for(lambda: roots(slack), timeout=10)
            bk.set_build_state("deploy-prod", 1, "passed")
            await bot.webhook(bk.webhook_payload("deploy-prod", 1))
            await slack.wait_for(lambda: replies(slack, roots(slack)[0].response["ts"]))
    finally:
        server.stop()
    assert len(bk.requests_to("POST")) == 1


async def test_canceling_a_failing_build_shows_canceling(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "failing", failed_jobs=["Test"])
    await slack.wait_for(lambda: "Failing" in blocks_text(current(slack, ts)["blocks"]))
    await send_state(bot, "canceling")
    await slack.wait_for(lambda: "Canceling" in blocks_text(current(slack, ts)["blocks"]))
    assert "build_cancel" not in buttons(current(slack, ts)["blocks"])


async def test_a_deleted_build_message_is_posted_again(bot: BotClient, slack: FakeSlack) -> None:
    ts = await deploy(bot)
    del slack.messages[CHANNEL][ts]
    await send_state(bot, "failed", failed_jobs=["Test"])
    await slack.wait_for(lambda: len(roots(slack)) == 2)
    new_ts = roots(slack)[1].response["ts"]
    assert "Failed" in blocks_text(current(slack, new_ts)["blocks"])
    await slack.wait_for(lambda: replies(slack, new_ts))
    assert "failed" in replies(slack, new_ts)[0].args["text"]


async def test_the_requester_is_told_when_the_channel_cannot_be_posted_in(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    slack.fail_next("chat.postMessage", error="not_in_channel", n=1)
    _, name, _ = await bot.command("/deploy", "deploy-prod")
    texts = await slack.wait_for(
        lambda: [t for t in bot.response_texts(name) if "cannot post" in t]
    )
    assert "`not_in_channel`" in texts[0] and "/invite @buildkite" in texts[0]
    assert "https://buildkite.com/acme/deploy-prod/builds/1" in texts[0]
    assert len(bk.requests_to("POST")) == 1


async def test_a_finished_build_retried_in_buildkite_is_followed_again(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "failed", failed_jobs=["Test"])
    await slack.wait_for(lambda: len(replies(slack, ts)) == 1)
    # Someone retries the failed job in Buildkite's UI: the build runs again, then passes.
    await send_state(bot, "running")
    await slack.wait_for(lambda: "Running" in blocks_text(current(slack, ts)["blocks"]))
    await send_state(bot, "passed")
    await slack.wait_for(lambda: any("passed" in c.args["text"] for c in replies(slack, ts)))
    assert "Passed" in blocks_text(current(slack, ts)["blocks"])


async def test_a_late_webhook_does_not_undo_a_newer_state(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "running")
    running = bk.webhook_payload("deploy-prod", 1)
    await send_state(bot, "passed")
    await slack.wait_for(lambda: replies(slack, ts))
    assert (await bot.webhook(running)).status == 200  # delivered late, out of order
    await bot.settled()
    assert "Passed" in blocks_text(current(slack, ts)["blocks"])
    assert len(replies(slack, ts)) == 1


async def test_a_long_commit_message_is_clipped_to_block_kit_limits(
    bot: BotClient, slack: FakeSlack
) -> None:
    message = ("fix & tidy a<b> " * 70)[:990]
    ts = await deploy(bot, f"deploy-prod main HEAD {message}")
    context = current(slack, ts)["blocks"][1]["elements"][0]["text"]
    assert "&amp;" in context and "a&lt;b&gt;" in context and "<b>" not in context


def test_clipping_never_splits_an_escaped_entity() -> None:
    text = clip(escape("a" * 2990 + " & more text"), 2996)
    assert len(text) <= 2996
    assert not text.rstrip("…").endswith(("&", "&a", "&am", "&amp"))


async def test_a_stopped_process_consumer_is_forgotten_by_the_notifier(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
) -> None:
    """Each process reads the events stream under a new name; the names of stopped ones with
    nothing left pending are dropped instead of piling up in the group."""
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url) as first:
        await deploy(first)
    consumers = await redis_client.xinfo_consumers(keys.EVENTS_STREAM, keys.EVENTS_GROUP)
    [old] = [c["name"] for c in consumers]
    forgetful = replace(DEFAULT, tracking=replace(DEFAULT.tracking, dead_consumer_idle_ms=0))

    async def forgotten() -> bool:
        consumers = await redis_client.xinfo_consumers(keys.EVENTS_STREAM, keys.EVENTS_GROUP)
        return old not in [c["name"] for c in consumers]

    async with running_bot(slack, bk, redis_url, tuning=forgetful):
        await wait_until(forgotten, timeout=30, what="the stopped consumer forgotten")
