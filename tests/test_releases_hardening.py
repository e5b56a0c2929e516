"""The release ledger under review: rollbacks and promotions wait in /deploy's queue and are
named truthfully wherever they are shown; hostile text stays text; a rollback asked twice starts
one build; the ledger holds against replicas, rebuilt builds and a Redis outage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from app.core.ledger_rebuild import rebuild_ledger
from app.core.release_actions import Releases
from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import RedisServer
from app.simulators.slack import FakeSlack
from app.slack.render.releases import LEDGER_DOWN
from app.storage import keys
from tests.test_policy_e2e import value_of
from tests.test_releases_e2e import (
    ALICE,
    BOB,
    BUILDS,
    CHANNEL,
    POLICY,
    SHA1,
    SHA2,
    SHA3,
    answer,
    deployed,
    entry,
    shown,
)
from tests.waiting import wait_until

SLUGS = ("deploy-prod", "prod-lite", "staging-deploy", "web", "ext-deploy", "ci")


def _tuning(running: int, waiting: int) -> Any:
    return replace(FAST, deploys=replace(FAST.deploys, running=running, waiting=waiting))


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    for slug in SLUGS:
        bk.add_pipeline(slug, repository="git@github.com:acme/app.git")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(
        slack, bk, redis_url, policy_file=str(policy), tuning=_tuning(1, 1)
    ) as client:
        yield client


def _seed(bk: FakeBuildkite, slug: str, *shas: str) -> None:
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    for sha in shas:
        bk.add_build(slug, commit=sha, state="passed", meta_data=meta, env={"A": "1"})


# -- 1. the deploy queue -------------------------------------------------------------------


async def test_rollback_and_promote_wait_their_turn_in_the_deploy_queue(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await deployed(bot, "web", SHA1)
    await deployed(bot, "web", SHA2)
    await deployed(bot, "staging-deploy", SHA1)
    bk.clear_requests()
    # Another deploy runs (the queue runs one at a time, with one more waiting).
    async with bot.services.deploys.reserve() as running:  # type: ignore[union-attr]
        await running.turn()
        _, waiting, ack = await bot.command("/deploy", "rollback web")
        assert "`web` is number 1 in line" in ack["text"]
        _, _, full = await bot.command("/deploy", "promote prod-lite")
        assert (
            "Too many deploys are starting right now, so `prod-lite` was not deployed"
            in (full["text"])
        )
        # Nothing was looked up, let alone started, while the rollback waits its turn.
        assert bk.requests == [] and bot.response_texts(waiting) == []
    (text,) = await slack.wait_for(partial(bot.response_texts, waiting))
    assert f"Rolling back `web` from `{SHA2[:12]}` (#2) to `{SHA1[:12]}` (#1)" in text
    assert [r.json["commit"] for r in bk.requests_to("POST")] == [SHA1]
    # The queue's place was given back: a promotion now goes ahead at once.
    _, name, ack = await bot.command("/deploy", "promote prod-lite")
    assert ack["text"] == ":hourglass_flowing_sand: Looking up what was deployed on `prod-lite`…"
    (text,) = await slack.wait_for(partial(bot.response_texts, name))
    assert "Promoting" in text


# -- 2. named truthfully -------------------------------------------------------------------


async def test_a_protected_rollback_is_named_a_rollback_in_confirmation_approval_and_audit(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    _seed(bk, "deploy-prod", SHA1, SHA2)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)

    reply = await answer(bot, "rollback deploy-prod")
    text = shown(reply)
    assert (
        f"`deploy-prod` is protected. Roll back `deploy-prod` from #2 (`{SHA2[:12]}`) to "
        f"`{SHA1[:12]}`?" in text
    )
    assert "Deploy this?" not in text
    buttons = [e["text"]["text"] for b in reply["blocks"] for e in b.get("elements", [])]
    assert buttons == ["Roll back", "Cancel"]
    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, name = await bot.click(
        "deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    await slack.wait_for(lambda: bot.response_texts(name))
    (post,) = await slack.wait_for(lambda: slack.posts(CHANNEL))
    assert (
        f"<@{ALICE}> asks to roll back `deploy-prod` from #2 (`{SHA2[:12]}`) to `{SHA1[:12]}`."
        in post.args["text"]
    )
    assert "asks to deploy" not in json.dumps(post.args)
    ts = post.response["ts"]
    approve = value_of(slack.message(CHANNEL, ts)["blocks"], "approval_approve")
    _, ok = await bot.click(
        "approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    await slack.wait_for(lambda: bot.response_texts(ok))
    decided = json.dumps(slack.message(CHANNEL, ts)["blocks"])
    assert "Rollback of `deploy-prod` requested by" in decided
    audit = (await answer(bot, "audit deploy-prod", user_id="U0ADMIN"))["text"]
    assert f"*approval requested* (rollback of #2 ({SHA2[:12]}) to {SHA1[:12]})" in audit
    assert f"*started* (rollback of #2 ({SHA2[:12]}) to {SHA1[:12]})" in audit


async def test_a_protected_promotion_is_named_a_promotion(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await deployed(bot, "staging-deploy", SHA3)
    reply = await answer(bot, "promote deploy-prod")
    text = shown(reply)
    assert f"Promote `{SHA3[:12]}` from `staging-deploy#1` to `deploy-prod`?" in text, text
    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, name = await bot.click(
        "deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    await slack.wait_for(lambda: bot.response_texts(name))
    (post,) = await slack.wait_for(
        lambda: [p for p in slack.posts(CHANNEL) if "asks to" in p.args["text"]]
    )
    assert (
        f"asks to promote `{SHA3[:12]}` from `staging-deploy#1` to `deploy-prod`"
        in post.args["text"]
    )
    assert bk.requests_to("POST", BUILDS.format("deploy-prod")) == []


# -- 3. a deploy route's final missed by webhook -------------------------------------------


async def test_a_deploy_route_build_announced_at_its_start_is_recorded_by_the_poller(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    # A route that announces the start follows the build, so the poller sees its end too.
    policy = tmp_path / "policy.yml"
    policy.write_text(
        "notifications:\n  - pipelines: [ext-live]\n    channel: C0CHAN\n"
        "    events: [started, passed, failed]\n    deploy: true\n"
    )
    bk.add_pipeline("ext-live", repository="git@github.com:acme/app.git")
    key = keys.DEPLOYMENT_KEY.format(pipeline="ext-live", number=1)
    # Polled often: a followed build not in the bot's own lists is fetched once it is stale.
    async with running_bot(
        slack, bk, redis_url, policy_file=str(policy), poll_interval=0.05
    ) as bot:
        bk.add_build("ext-live", commit=SHA1, state="running")
        assert (await bot.webhook(bk.webhook_payload("ext-live", 1))).status == 200
        await bot.settled()
        assert await redis_client.get(key) is None  # a route's build: recorded when it ends
        bk.set_build_state("ext-live", 1, "passed")  # and its build.finished webhook is lost
        await wait_until(lambda: redis_client.get(key), timeout=30, what="the deployment recorded")
        recorded = await entry(redis_client, "ext-live", 1)
        assert recorded["o"] == "passed" and recorded["c"] == SHA1 and recorded["s"] == "route"
    assert bk.requests_to("GET", BUILDS.format("ext-live") + "/1")


# -- 4. running now ------------------------------------------------------------------------


async def test_deploying_now_is_what_the_tracker_follows_even_when_blocked_for_days(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    # A build the bot started before Redis was lost: recorded running by the ledger rebuild,
    # but nobody follows it any more, so it is never seen to end: not "deploying now".
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    bk.add_build("web", commit=SHA1, state="running", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    # A deploy from Slack, waiting on a block step: followed, so deploying now.
    reply = await answer(bot, f"web main {SHA2}")
    assert "Started" in reply["text"]
    bk.set_build_state("web", 2, "passed", blocked=True)
    await bot.webhook(bk.webhook_payload("web", 2))
    await bot.settled()
    text = shown(await answer(bot, "status web"))
    assert f"deploying now: `{SHA2[:12]}` in <https://buildkite.com/acme/web/builds/2|#2>" in text
    assert SHA1[:12] not in text
    assert "#1" in shown(await answer(bot, "history web"))  # history says it ran, as recorded
    # Still blocked three days on: still deploying now (a day's cut hid it).
    (later,) = await Releases(services).status("web", now=time.time() + 3 * 86400)
    assert [entry.number for entry in later.running] == [2]


# -- hostile text --------------------------------------------------------------------------


async def test_digits_that_are_not_ascii_are_refused_with_the_usage(bot: BotClient) -> None:
    # "²".isdigit() is True but int("²") raises: each is answered, never an error.
    for text, said in (
        ("history web ²", "`²` is not a number of deployments"),
        ("rollback web to #²", "`#²` is not a build number"),
        ("rollback web ³", "Usage: `/deploy rollback <pipeline> [to #N]"),
        ("history web 0000000000007", "is not a number of deployments"),
    ):
        resp, _, ack = await bot.command("/deploy", text)
        assert resp.status == 200
        assert said in ack["text"], (text, ack)
    for command in ("/cancel", "/rebuild"):  # the same trap in their build numbers
        resp, _, ack = await bot.command(command, "web ²")
        assert resp.status == 200 and "`²` is not a build number" in ack["text"], ack


async def test_hostile_branch_and_meta_data_of_a_deploy_route_build_stay_text(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    branch = "<!channel>*x*`y`<https://evil.example|click>"
    meta = {
        "chatops_rollback_of": "²",
        "chatops_requested_by": "<!here>",
        "chatops_approved_by": "U0BOB> <!channel",
        "chatops_promoted_from": "<!channel>#1",
    }
    bk.add_build("ext-deploy", commit=SHA2, branch=branch, state="passed", meta_data=meta)
    assert (await bot.webhook(bk.webhook_payload("ext-deploy", 1))).status == 200
    await bot.settled()
    recorded = await entry(redis_client, "ext-deploy", 1)
    assert recorded["b"] == branch and recorded["s"] == "route"
    assert not {"rb", "r", "a", "pf"} & set(recorded)  # none of them is what the bot writes
    for asked in ("status ext-deploy", "status all", "history ext-deploy"):
        reply = await answer(bot, asked)
        body = json.dumps(reply)
        assert "<!channel>" not in body and "<!here>" not in body, asked
        assert "<https://evil" not in body, asked
    assert "&lt;!channel&gt;*x*'y'&lt;https://evil.example|click&gt;" in shown(
        await answer(bot, "history ext-deploy")
    )


# -- permissions -----------------------------------------------------------------------------


async def test_rollback_and_promote_are_held_to_the_rule_of_deploy_and_its_env_rules(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(
        "admins: [U0ADMIN]\npipelines:\n  web:\n    deployers: [U0BOB]\n    channels: [C0OPS]\n"
        "    promote_from: staging\n"
    )
    for slug in ("web", "staging"):
        bk.add_pipeline(slug)
    meta = {"chatops_source": "slack", "chatops_requested_by": BOB}
    bk.add_build("staging", commit=SHA1, state="passed", meta_data=meta)
    bk.add_build("web", commit=SHA1, state="passed", meta_data=meta, env={"LD_PRELOAD": "/x.so"})
    bk.add_build("web", commit=SHA2, state="passed", meta_data=meta)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as bot:
        services = bot.services
        await rebuild_ledger(services.store, services.buildkite, services.policy)
        bk.clear_requests()
        for user, channel in ((ALICE, "C0OPS"), (BOB, CHANNEL)):
            for text in ("rollback web", "promote web"):
                reply = await answer(bot, text, user_id=user, channel_id=channel)
                assert reply["text"].startswith(":no_entry:"), (text, user, reply)
        assert bk.requests == []  # refused before anything is looked up
        # Anyone may read what is live and what happened (ephemeral, as /deploy locks).
        assert "live:" in shown(await answer(bot, "status web", user_id=ALICE))
        assert "#2" in shown(await answer(bot, "history web", user_id=ALICE))
        # Bob, in #ops: the rollback to #1 carries #1's env, which the env rules refuse.
        refused = await answer(bot, "rollback web", user_id=BOB, channel_id="C0OPS")
        assert "LD_PRELOAD" in refused["text"] and "Nothing was started" in refused["text"]
        promoted = await answer(bot, "promote web", user_id=BOB, channel_id="C0OPS")
        assert "Promoting" in promoted["text"], promoted
        assert [r.json["commit"] for r in bk.requests_to("POST")] == [SHA1]
        audit = (await answer(bot, "audit web", user_id="U0ADMIN"))["text"]
        assert audit.count("*refused*") == 5, audit


# -- a Redis outage ------------------------------------------------------------------------


async def test_status_and_history_during_a_redis_outage_say_so_without_a_traceback(
    slack: FakeSlack, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture
) -> None:
    bk.add_pipeline("web")
    server = RedisServer()
    server.start()
    try:
        async with running_bot(slack, bk, server.url) as bot:
            await deployed(bot, "web", SHA1)
            server.stop()
            for text in ("status web", "status all", "history web 50"):
                reply = await answer(bot, text)
                assert reply["text"] == LEDGER_DOWN, (text, reply)
            reply = await answer(bot, "rollback web")
            assert "nothing was started" in reply["text"]
    finally:
        server.stop()
    assert [r.getMessage() for r in caplog.records if r.exc_info and "app" in r.name] == []


# -- the largest history -----------------------------------------------------------------------


async def test_the_largest_history_of_the_longest_branches_fits_one_slack_message(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    branch = "<&>" * 85  # 255 characters, each escaped to 4 or 5
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE, "chatops_approved_by": BOB}
    for index in range(60):
        bk.add_build("web", commit=f"{index:040x}", branch=branch, state="failed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    for text in ("history web 50", "status web", "status all"):
        reply = await answer(bot, text)
        blocks = reply["blocks"]
        sections = [str(b["text"]["text"]) for b in blocks]
        assert len(blocks) <= 50 and all(len(s) <= 3000 for s in sections), text
        assert len(json.dumps(blocks, ensure_ascii=False)) < 13_000, text
        assert "<&>" not in json.dumps(blocks), text
    assert "more not shown" in shown(await answer(bot, "history web 50"))


# -- asked twice -------------------------------------------------------------------------------


async def test_a_rollback_sent_twice_or_confirmed_twice_starts_one_build(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await deployed(bot, "web", SHA1)
    await deployed(bot, "web", SHA2)
    # Slack retries the same command (same trigger_id): one rollback.
    first = await answer(bot, "rollback web", trigger_id="13345.T1")
    again = await answer(bot, "rollback web", trigger_id="13345.T1")
    assert "Rolling back" in first["text"] and "Rolling back" not in again["text"]
    assert [r.json["commit"] for r in bk.requests_to("POST", BUILDS.format("web"))][2:] == [SHA1]
    # A protected rollback confirmed twice at once: one approval request, one build at most.
    _seed(bk, "deploy-prod", SHA1, SHA2)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    confirm = value_of((await answer(bot, "rollback deploy-prod"))["blocks"], "deploy_confirm")
    clicks = [
        bot.click(
            "deploy_confirm",
            confirm,
            channel=CHANNEL,
            message_ts="1.1",
            ephemeral=True,
            action_ts=f"1700000000.00000{n}",
        )
        for n in (1, 2)
    ]
    names = [name for _, name in await asyncio.gather(*clicks)]
    for name in names:
        await slack.wait_for(partial(bot.response_texts, name))
    await bot.settled()
    asks = [p for p in slack.posts(CHANNEL) if "asks to roll back" in p.args["text"]]
    assert len(asks) == 1
    texts = [t for name in names for t in bot.response_texts(name)]
    assert any("no longer" in t or "expired" in t or "already" in t for t in texts), texts


# -- what is deployed again must be a commit -----------------------------------------------------


async def test_a_deployment_built_from_head_is_neither_rolled_back_to_nor_promoted(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    # Built as `HEAD` (Buildkite kept it so): deploying it again would build today's branch.
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    for slug in ("web", "staging-deploy"):
        bk.add_build(slug, commit="HEAD", state="passed", meta_data=meta)
    bk.add_build("web", commit=SHA2, state="passed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    rollback = (await answer(bot, "rollback web to #1"))["text"]
    assert "#1's commit is not a commit SHA" in rollback and "Nothing was started" in rollback
    # Without `to #N`, it is passed over: nothing else to go back to.
    assert "Nothing to roll back to" in (await answer(bot, "rollback web"))["text"]
    promote = (await answer(bot, "promote prod-lite"))["text"]
    assert "#1's commit is not a commit SHA" in promote and "Nothing was started" in promote
    assert bk.requests_to("POST") == []


# -- a build that ends again ------------------------------------------------------------------


async def test_a_deployment_whose_failed_jobs_are_retried_ends_again_as_passed(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    number = await deployed(bot, "web", SHA1, state="failed")
    assert (await entry(redis_client, "web", number))["o"] == "failed"
    assert "nothing live" in shown(await answer(bot, "status web"))
    # Someone retries the failed job in Buildkite: the same build runs and ends again.
    bk.set_build_state("web", number, "running")
    await bot.webhook(bk.webhook_payload("web", number))
    await bot.settled()
    assert (await entry(redis_client, "web", number))["o"] == "failed"  # running never replaces
    bk.now = lambda: datetime.now(UTC) + timedelta(minutes=5)  # it ends again, later
    bk.set_build_state("web", number, "passed")
    await bot.webhook(bk.webhook_payload("web", number))
    await bot.settled()
    again = await entry(redis_client, "web", number)
    assert again["o"] == "passed" and again["r"] == ALICE
    assert f"live: `{SHA1[:12]}`" in shown(await answer(bot, "status web"))


async def test_a_buildkite_rebuild_on_a_deploy_route_is_not_credited_with_its_originals_approval(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    marks = {
        "chatops_source": "slack",
        "chatops_requested_by": ALICE,
        "chatops_approved_by": BOB,
        "chatops_rollback_of": "3",
    }
    original = bk.add_build("ext-deploy", commit=SHA1, state="passed", meta_data=marks)
    rebuilt = bk.add_build("ext-deploy", commit=SHA1, state="passed", meta_data=marks)
    rebuilt["rebuilt_from"] = {"id": original["id"], "number": 1, "url": original["url"]}
    for number in (1, 2):
        assert (await bot.webhook(bk.webhook_payload("ext-deploy", number))).status == 200
    await bot.settled()
    first, second = [await entry(redis_client, "ext-deploy", n) for n in (1, 2)]
    assert (first["r"], first["a"], first["rb"]) == (ALICE, BOB, 3)
    assert not {"r", "a", "rb", "pf"} & set(second), second
    assert (
        f"approved by <@{BOB}>" not in shown(await answer(bot, "history ext-deploy")).split("\n")[1]
    )
