"""What bounds an agent: locks, the person it acts for, its budgets, retries that must not
start a second build, the audit trail that shows it all, and tokens that never leak."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, BotLog, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from tests.agents_support import (
    AGENT_TOKENS,
    BOB,
    BUILDS,
    CAPTAIN_TOKEN,
    CHANNEL,
    THRIFTY_TOKEN,
    add_pipelines,
    agent_session,
    call,
    error_text,
    mutations,
    structured,
    write_policy,
)


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    add_pipelines(bk)
    async with running_bot(slack, bk, redis_url, policy_file=write_policy(tmp_path)) as client:
        yield client


async def test_a_lock_binds_an_agent(bot: BotClient, bk: FakeBuildkite) -> None:
    # Even its own person's lock binds it: only the holder may deploy.
    await bot.command("/deploy", "lock web hotfix in progress")
    await bot.settled()
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        check = await structured(session, "check_policy", action="deploy", pipeline="web")
        refused = await structured(session, "deploy", pipeline="web")
    assert check["allowed"] is False and check["locked_by"] == "U0USER"
    assert refused["status"] == "refused"
    assert (
        "locked by user U0USER" in refused["reason"] and "hotfix in progress" in refused["reason"]
    )
    assert mutations(bk) == []


async def test_an_agent_never_has_more_rights_than_its_person(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    # bob-only grants agent:captain, but captain acts for Alice, who may not deploy it.
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        refused = await structured(session, "deploy", pipeline="bob-only")
        me = await structured(session, "whoami")
    assert refused["status"] == "refused"
    assert "acts for user U0USER, who may not deploy `bob-only`" in refused["reason"]
    assert mutations(bk) == []
    assert me["agent"] == "captain" and me["acts_for"] == "U0USER"
    assert me["organization"] == "acme"
    assert me["allowed"]["bob-only"] == ["deploy", "cancel", "rebuild", "unblock"]


async def test_a_spent_budget_is_refused_saying_when_to_try_again(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    async with agent_session(bot, THRIFTY_TOKEN) as session:
        first = await structured(session, "deploy", pipeline="web")
        second = await structured(session, "deploy", pipeline="web", branch="other")
        await structured(session, "whoami")
        await structured(session, "whoami")
        third = await call(session, "whoami")
        for _ in range(5):  # a flood of calls past the budget
            assert (await call(session, "whoami")).is_error
    assert first["status"] == "started"
    assert second["status"] == "refused"
    assert (
        "budget of 1 mutations per hour" in second["reason"] and "try again in" in second["reason"]
    )
    assert "budget of 2 reads per minute" in error_text(third)
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 1
    # The window's first refusal is audited; the flood after it only counted.
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    entries = [{k.decode(): v.decode() for k, v in f.items()} for _, f in raw]
    refused = [e["action"] for e in entries if e["outcome"] == "refused"]
    assert sorted(refused) == ["mcp deploy", "mcp whoami"]


async def test_a_retried_deploy_starts_one_build(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        keyed = await structured(session, "deploy", pipeline="web", idempotency_key="k-1")
        keyed_again = await structured(session, "deploy", pipeline="web", idempotency_key="k-1")
        # Without a key, the same arguments within the minute are the same call.
        plain = await structured(session, "deploy", pipeline="web", branch="feature/x")
        plain_again = await structured(session, "deploy", pipeline="web", branch="feature/x")
    assert keyed == keyed_again and keyed["status"] == "started"
    assert plain == plain_again and plain["build"]["number"] != keyed["build"]["number"]
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 2
    await bot.settled()
    assert len(slack.posts(CHANNEL)) == 2  # one build message each
    async with bot.http.get(f"{bot.base}/metrics") as resp:
        page = await resp.text()
    assert 'bkchatops_agent_calls_total{outcome="started",tool="deploy"} 2.0' in page
    assert 'bkchatops_agent_calls_total{outcome="repeated",tool="deploy"} 2.0' in page
    assert "bkchatops_agent_waits 0.0" in page


async def test_cancel_rebuild_and_retry_go_through_the_core(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build("web", state="running")
    bk.add_build("web", state="failed", failed_jobs=["Test"])
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        canceled = await structured(session, "cancel_build", pipeline="web", number=1)
        read = await structured(session, "get_build", pipeline="web", number=2)
        rebuilt = await structured(session, "rebuild_build", pipeline="web", number=2)
        retried = await structured(session, "retry_failed_jobs", pipeline="web", number=2)
    assert canceled["status"] == "started" and canceled["build"]["number"] == 1
    assert len(bk.requests_to("PUT", BUILDS.format("web") + "/1/cancel")) == 1
    assert rebuilt["status"] == "started" and rebuilt["build"]["number"] == 3
    assert len(bk.requests_to("PUT", BUILDS.format("web") + "/2/rebuild")) == 1
    assert retried["status"] == "started"
    assert read["build"]["failed_jobs"][0]["name"]["untrusted"] is True
    await bot.settled()
    texts = json.dumps([c.args for c in slack.posts(CHANNEL)])
    assert "agent `captain` retried the failed jobs" in texts


async def test_deploy_audit_shows_the_agents_calls_and_no_token_leaks(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, bot_log: BotLog
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        await structured(
            session, "deploy", pipeline="web", env={"API_TOKEN": "s3cr3t-value", "MODE": "fast"}
        )
    await bot.settled()
    _, name, _ = await bot.command("/deploy", "audit web", user_id="U0ADMIN")
    audit = (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    assert "agent `captain` mcp deploy `web #1` in <#C0CHAN>: *started* (for U0USER;" in audit
    assert "agent `captain` deploy `web #1` in <#C0CHAN>: *started*" in audit
    assert "***" in audit and "s3cr3t-value" not in audit  # secret-looking env values masked
    assert bot_log.leaks(*AGENT_TOKENS, "s3cr3t-value") == []
    everything = json.dumps([c.args for c in slack.calls]) + json.dumps(
        [r.json for r in bk.requests if r.json is not None]
    )
    assert not any(token in everything for token in AGENT_TOKENS)


async def test_bad_arguments_get_a_sentence_and_touch_nothing(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        bad = await call(session, "deploy", pipeline="Not A Slug", commit="zz")
        unknown = await call(session, "deploy", pipeline="web", surprise=True)
        too_long = await call(
            session, "wait_for_build", pipeline="web", number=1, timeout_seconds=90
        )
    assert "The arguments are not valid: pipeline:" in error_text(bad)
    assert "commit" in error_text(bad)
    assert "surprise" in error_text(unknown)
    assert "timeout_seconds" in error_text(too_long)
    assert mutations(bk) == []
