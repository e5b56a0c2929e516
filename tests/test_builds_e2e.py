"""Unblock steps, retry failed jobs, auto-retry, and channel notifications, end to end."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

CHANNEL, NOTIFY, OTHER = "C0CHAN", "C0NOTIFY", "C0OTHER"
ALICE, BOB = "U0USER", "U0BOB"
FIELDS = [
    {"text": "Release notes", "key": "notes", "required": True, "hint": "What changes?"},
    {
        "select": "Region",
        "key": "region",
        "required": True,
        "default": "eu",
        "options": [{"label": "Europe", "value": "eu"}, {"label": "US", "value": "us"}],
    },
]


async def start(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path, policy: str = ""
) -> Any:
    path = tmp_path / "policy.yml"
    path.write_text(policy or "{}\n")
    return running_bot(slack, bk, redis_url, policy_file=str(path))


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    bk.add_pipeline("deploy-prod", block="Release", steps=("Test", "Deploy"))
    bk.add_pipeline("forms", block="Approve release", block_fields=FIELDS)
    bk.add_pipeline("web")
    async with await start(slack, bk, redis_url, tmp_path) as client:
        yield client


def roots(slack: FakeSlack, channel: str = CHANNEL) -> list[Any]:
    return [c for c in slack.posts(channel) if not c.args.get("thread_ts")]


def thread(slack: FakeSlack, ts: str, channel: str = CHANNEL) -> list[str]:
    return [c.args["text"] for c in slack.posts(channel) if c.args.get("thread_ts") == ts]


def button(slack: FakeSlack, ts: str, action_id: str, channel: str = CHANNEL) -> dict[str, Any]:
    for block in slack.message(channel, ts)["blocks"]:
        for element in block.get("elements", []):
            if element.get("action_id") == action_id:
                return dict(element)
    raise AssertionError(f"no {action_id} button")


async def deploy(bot: BotClient, pipeline: str) -> str:
    before = len(roots(bot.slack))
    await bot.command("/deploy", pipeline)
    posts = await bot.slack.wait_for(lambda: len(roots(bot.slack)) > before and roots(bot.slack))
    assert posts
    return str(posts[-1].response["ts"])


async def move(bot: BotClient, slug: str, state: str, number: int = 1, **kwargs: Any) -> None:
    bot.bk.set_build_state(slug, number, state, **kwargs)
    assert (await bot.webhook(bot.bk.webhook_payload(slug, number))).status == 200


# -- unblock ---------------------------------------------------------------------------------


async def test_unblock_without_fields(bot: BotClient, slack: FakeSlack, bk: FakeBuildkite) -> None:
    ts = await deploy(bot, "deploy-prod")
    await move(bot, "deploy-prod", "passed", blocked=True)
    unblock = await slack.wait_for(lambda: _has(slack, ts, "build_unblock"))
    assert unblock is not None
    assert unblock["text"]["text"] == "Unblock: Release"
    _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=ts)
    assert "Unblocked *Release*" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    (put,) = bk.requests_to("PUT", "/organizations/acme/pipelines/deploy-prod/builds/1/jobs/")
    assert put.path.endswith("/unblock") and put.json in ({}, None)
    await slack.wait_for(lambda: any("unblocked *Release*" in t for t in thread(slack, ts)))
    await slack.wait_for(lambda: "Running" in json.dumps(slack.message(CHANNEL, ts)["blocks"]))
    assert "build_unblock" not in json.dumps(slack.message(CHANNEL, ts)["blocks"])


def _has(slack: FakeSlack, ts: str, action_id: str) -> dict[str, Any] | None:
    try:
        return button(slack, ts, action_id)
    except AssertionError:
        return None


async def test_unblock_with_fields_opens_a_modal_and_sends_the_values(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot, "forms")
    await move(bot, "forms", "passed", blocked=True)
    unblock = await slack.wait_for(lambda: _has(slack, ts, "build_unblock"))
    assert unblock is not None
    await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=ts)
    opened = await slack.wait_for(lambda: slack.calls_to("views.open"))
    view = opened[0].args["view"]
    inputs = {b["block_id"]: b for b in view["blocks"] if b["type"] == "input"}
    assert inputs["field:notes"]["element"]["type"] == "plain_text_input"
    assert inputs["field:notes"]["hint"]["text"] == "What changes?"
    assert inputs["field:region"]["element"]["initial_option"]["value"] == "eu"
    assert bk.requests_to("PUT") == []

    # A value Buildkite refuses shows in the modal, and nothing is unblocked.
    bad = await _submit(bot, view, {"field:notes": "v2", "field:region": "mars"})
    assert bad["response_action"] == "errors" and "field:region" in bad["errors"]
    good = await _submit(bot, view, {"field:notes": "Ship v2", "field:region": "us"})
    assert good == {}
    puts = [r for r in bk.requests_to("PUT") if r.path.endswith("/unblock")]
    assert puts[-1].json == {"fields": {"notes": "Ship v2", "region": "us"}}
    replies = await slack.wait_for(lambda: [t for t in thread(slack, ts) if "unblocked" in t])
    assert "*Approve release*" in replies[0] and "`Ship v2`" in replies[0]


async def _submit(bot: BotClient, view: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    state = {}
    for block_id, value in values.items():
        if block_id == "field:region":
            state[block_id] = {
                "value": {"type": "static_select", "selected_option": {"value": value}}
            }
        else:
            state[block_id] = {"value": {"type": "plain_text_input", "value": value}}
    payload = {
        "type": "view_submission",
        "team": {"id": "T0001", "domain": "fake"},
        "user": {"id": ALICE, "username": "alice", "name": "alice", "team_id": "T0001"},
        "api_app_id": "A0FAKE",
        "token": "x",
        "trigger_id": slack_requests.new_trigger_id(),
        "view": {**view, "id": "V0001", "state": {"values": state}},
    }
    body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
    async with bot.http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        assert resp.status == 200
        raw = await resp.read()
    return json.loads(raw) if raw else {}


async def test_an_unblock_refused_by_the_policy(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    bk.add_pipeline("deploy-prod", block="Release")
    policy = "pipelines:\n  deploy-prod:\n    deployers: [U0USER]\n    unblockers: [U0BOB]\n"
    async with await start(slack, bk, redis_url, tmp_path, policy) as bot:
        ts = await deploy(bot, "deploy-prod")
        await move(bot, "deploy-prod", "passed", blocked=True)
        unblock = await slack.wait_for(lambda: _has(slack, ts, "build_unblock"))
        assert unblock is not None
        _, name = await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=ts)
        text = (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    assert "You may not unblock `deploy-prod`" in text and "<@U0BOB>" in text
    assert [r for r in bk.requests_to("PUT")] == []


# -- retry failed jobs --------------------------------------------------------------------------


async def test_retry_failed_jobs_then_pass_is_reported_as_passed_after_retry(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    ts = await deploy(bot, "web")
    await move(bot, "web", "failed", failed_jobs=["Test"])
    retry = await slack.wait_for(lambda: _has(slack, ts, "build_retry_failed"))
    assert retry is not None
    assert _has(slack, ts, "build_rebuild") is not None
    _, name = await bot.click("build_retry_failed", retry["value"], channel=CHANNEL, message_ts=ts)
    assert "Retrying" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    assert [r.path for r in bk.requests_to("PUT")] == [
        "/v2/organizations/acme/pipelines/web/builds/1/retry_failed_jobs"
    ]
    await slack.wait_for(
        lambda: any("retried the failed jobs" in t and "Test" in t for t in thread(slack, ts))
    )
    await slack.wait_for(lambda: "Running" in json.dumps(slack.message(CHANNEL, ts)["blocks"]))
    await move(bot, "web", "passed")
    await slack.wait_for(lambda: any("passed after retry" in t for t in thread(slack, ts)))
    assert len(roots(slack)) == 1


async def test_auto_retry_respects_attempts_and_the_hourly_budget(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    bk.add_pipeline("flaky")
    policy = "pipelines:\n  flaky:\n    auto_retry: {max_attempts: 1, hourly_budget: 1}\n"
    async with await start(slack, bk, redis_url, tmp_path, policy) as bot:
        ts = await deploy(bot, "flaky")
        await move(bot, "flaky", "failed", failed_jobs=["Test"])
        await slack.wait_for(
            lambda: any("Auto-retried failed jobs (attempt 1 of 1)" in t for t in thread(slack, ts))
        )
        await move(bot, "flaky", "failed", failed_jobs=["Test"])  # fails again: no more
        await slack.wait_for(lambda: len([t for t in thread(slack, ts) if "failed" in t]) >= 2)
        second = await deploy(bot, "flaky")
        await move(bot, "flaky", "failed", number=2, failed_jobs=["Test"])
        await slack.wait_for(
            lambda: any(
                "used its budget of 1 automatic retries" in t for t in thread(slack, second)
            )
        )
    retries = [r for r in bk.requests_to("PUT") if r.path.endswith("/retry_failed_jobs")]
    assert [r.path.split("/builds/")[1] for r in retries] == ["1/retry_failed_jobs"]


# -- failure details -----------------------------------------------------------------------


async def test_failure_reply_has_a_clipped_log_tail(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot, "web")
    bk.set_build_state("web", 1, "failed", failed_jobs=["Test"])
    job = next(j for j in bk.build("web", 1)["jobs"] if j.get("name") == "Test")
    lines = [f"\x1b[31mline {i} " + "x" * 150 + "\x1b[0m" for i in range(400)] + [
        "FINAL ERROR ```boom```"
    ]
    bk.set_job_log(job["id"], "\n".join(lines))
    await bot.webhook(bk.webhook_payload("web", 1))
    final = await slack.wait_for(
        lambda: [
            c
            for c in slack.posts(CHANNEL)
            if c.args.get("thread_ts") == ts and "failed" in c.args["text"]
        ]
    )
    blocks = final[0].args["blocks"]
    log_text = blocks[-1]["text"]["text"]
    assert len(log_text) <= 3000
    assert "FINAL ERROR" in log_text and "\x1b" not in log_text
    assert log_text.count("```") == 2  # the log's own backticks cannot close the block
    assert "line 399" in log_text and "line 0 " not in log_text
    assert sum(len(json.dumps(b)) for b in blocks) < 13_000
    tail_requests = bk.requests_to(
        "GET", f"/organizations/acme/pipelines/web/builds/1/jobs/{job['id']}/log"
    )
    assert tail_requests and tail_requests[0].headers["Range"].startswith("bytes=-")


async def test_missing_read_build_logs_degrades_to_a_link(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.scopes.remove("read_build_logs")
    ts = await deploy(bot, "web")
    await move(bot, "web", "failed", failed_jobs=["Test"])
    final = await slack.wait_for(
        lambda: [
            c
            for c in slack.posts(CHANNEL)
            if c.args.get("thread_ts") == ts and "failed" in c.args["text"]
        ]
    )
    note = json.dumps(final[0].args["blocks"][-1])
    assert "lacks the `read_build_logs` scope" in note
    assert "https://buildkite.com/acme/web/builds/1#" in note


# -- channel notifications -------------------------------------------------------------------

ROUTES = """\
notifications:
  - pipelines: ["web*"]
    channel: C0NOTIFY
  - pipelines: [web]
    branches: ["release/*"]
    channel: C0OTHER
    events: [started, passed]
"""


@pytest.fixture
async def routed(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_channel(NOTIFY, "builds")
    slack.add_channel(OTHER, "releases")
    slack.add_user("U0DANA", "dana", "dana@example.com")
    bk.add_pipeline("web")
    async with await start(slack, bk, redis_url, tmp_path, ROUTES) as client:
        yield client


async def webhook(bot: BotClient, slug: str, number: int, state: str, **kwargs: Any) -> None:
    bot.bk.set_build_state(slug, number, state, **kwargs)
    assert (await bot.webhook(bot.bk.webhook_payload(slug, number))).status == 200


async def test_default_route_announces_failures_and_default_branch_builds_only(
    routed: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", branch="feature/x")
    await webhook(routed, "web", 1, "running")
    await webhook(routed, "web", 1, "passed")  # a passing feature branch: no news
    bk.add_build("web", branch="feature/y")
    await webhook(routed, "web", 2, "failing", failed_jobs=["Test"])
    await webhook(routed, "web", 2, "failed", failed_jobs=["Test"])
    bk.add_build("web", branch="main")
    await webhook(routed, "web", 3, "running")
    await slack.wait_for(lambda: len(roots(slack, NOTIFY)) == 2)
    texts = [c.args["text"] for c in roots(slack, NOTIFY)]
    # The message shows the state when it is posted: failing, or already failed.
    assert texts[0] in ("web #2: Failing", "web #2: Failed") and texts[1] == "web #3: Running"
    blocks = json.dumps(roots(slack, NOTIFY)[0].args["blocks"])
    assert "Triggered by" in blocks
    # The routed message follows the build to its end, in place, with its thread.
    ts2 = roots(slack, NOTIFY)[0].response["ts"]
    await slack.wait_for(lambda: "Failed" in json.dumps(slack.message(NOTIFY, ts2)["blocks"]))
    await slack.wait_for(lambda: any("Failed jobs" in t for t in thread(slack, ts2, NOTIFY)))
    assert roots(slack, OTHER) == []


async def test_branch_filter_and_started_and_passed_events(
    routed: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", branch="release/2.4")
    await webhook(routed, "web", 1, "running")
    await slack.wait_for(lambda: roots(slack, OTHER))
    await webhook(routed, "web", 1, "passed")
    ts = roots(slack, OTHER)[0].response["ts"]
    await slack.wait_for(lambda: "Passed" in json.dumps(slack.message(OTHER, ts)["blocks"]))
    bk.add_build("web", branch="release/2.5")
    await webhook(routed, "web", 2, "passed")  # "passed" alone also announces
    await slack.wait_for(lambda: len(roots(slack, OTHER)) == 2)
    assert roots(slack, NOTIFY) == []  # release branches pass quietly in the default route


async def test_never_two_messages_for_one_build_in_one_channel(
    routed: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", branch="feature/z")
    bk.set_build_state("web", 1, "failed", failed_jobs=["Test"])
    payload = bk.webhook_payload("web", 1)
    for _ in range(3):
        await routed.webhook(payload)
    await slack.wait_for(lambda: roots(slack, NOTIFY))
    await routed.services.poller.poll_once()
    await routed.webhook(payload)
    await routed.settled()
    assert len(roots(slack, NOTIFY)) == 1


async def test_a_deploy_started_from_slack_in_a_routed_channel_is_not_announced_twice(
    routed: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await routed.command("/deploy", "web", channel_id=NOTIFY, channel_name="builds")
    await slack.wait_for(lambda: roots(slack, NOTIFY))
    await webhook(routed, "web", 1, "running")  # on main: the route would announce it
    await webhook(routed, "web", 1, "failed", failed_jobs=["Test"])
    ts = roots(slack, NOTIFY)[0].response["ts"]
    await slack.wait_for(lambda: any("failed" in t for t in thread(slack, ts, NOTIFY)))
    assert len(roots(slack, NOTIFY)) == 1


async def test_first_failure_and_fixed_transitions(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    slack.add_channel(NOTIFY, "builds")
    bk.add_pipeline("api")
    policy = (
        "notifications:\n  - pipelines: [api]\n    channel: C0NOTIFY\n"
        "    events: [first_failure, fixed]\n"
    )
    async with await start(slack, bk, redis_url, tmp_path, policy) as bot:
        for number, state in enumerate(["passed", "failed", "failed", "passed", "passed"], 1):
            bk.add_build("api", branch="main")
            await webhook(
                bot, "api", number, state, failed_jobs=["Test"] if state == "failed" else ()
            )
        await slack.wait_for(lambda: len(roots(slack, NOTIFY)) == 2)
        await bot.settled()
    assert [c.args["text"] for c in roots(slack, NOTIFY)] == ["api #2: Failed", "api #4: Passed"]


async def test_the_author_of_a_failed_build_is_mentioned(
    routed: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    build = bk.add_build("web", branch="feature/q")
    build["author"] = {"name": "Dana", "email": "dana@example.com"}
    await webhook(routed, "web", 1, "failed", failed_jobs=["Test"])
    await slack.wait_for(lambda: roots(slack, NOTIFY))
    ts = roots(slack, NOTIFY)[0].response["ts"]
    replies = await slack.wait_for(lambda: thread(slack, ts, NOTIFY))
    assert replies[0].startswith("<@U0DANA> ")
    assert slack.calls_to("users.lookupByEmail")[0].args["email"] == "dana@example.com"
    assert re.search(r"Dana", json.dumps(slack.message(NOTIFY, ts)["blocks"]))
