"""The release ledger over MCP, through the SDK's own client: `deployments` (Redis only),
`rollback` and `promote` through the same core as /deploy (grants, the person's rights,
approvals by people, idempotency, budgets, audit), and freezes that bind agents with no
break-glass, reported by check_policy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession

from app.core.ledger_rebuild import rebuild_ledger
from app.simulators.bot import BotClient, running_bot, work_requests
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from tests.agents_support import (
    ALICE,
    BOB,
    BUILDS,
    CAPTAIN_TOKEN,
    CHANNEL,
    INTRUDER_TOKEN,
    THRIFTY_TOKEN,
    agent_session,
    call,
    error_text,
    mutations,
    sha,
    structured,
    write_policy,
)

SHA1, SHA2, SHA3 = "1" * 40, "2" * 40, "3" * 40

POLICY = f"""\
admins: [U0ADMIN]
agents:
  captain:
    token_sha256: "{sha(CAPTAIN_TOKEN)}"
    acts_for: {ALICE}
    channel: {CHANNEL}
    budget: {{mutations_per_hour: 30, reads_per_minute: 200}}
  intruder:
    token_sha256: "{sha(INTRUDER_TOKEN)}"
    channel: {CHANNEL}
  thrifty:
    token_sha256: "{sha(THRIFTY_TOKEN)}"
    channel: {CHANNEL}
    budget: {{mutations_per_hour: 1, reads_per_minute: 2}}
default:
  deployers: [{ALICE}, "agent:captain", "agent:thrifty"]
pipelines:
  deploy-prod:
    channels: [{CHANNEL}]
    deployers: [{ALICE}, {BOB}, "agent:captain"]
    protected: true
    approval:
      approvers: [{ALICE}, {BOB}]
  prod-lite:
    deployers: [{ALICE}, "agent:captain"]
    promote_from: staging-deploy
freezes:
  - pipelines: ["frozen-*"]
    from: 2020-01-01T00:00
    to: 2099-01-01T00:00
    timezone: UTC
    reason: audit freeze
"""

PIPELINES = ("web", "deploy-prod", "prod-lite", "staging-deploy", "frozen-app")


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    for slug in PIPELINES:
        bk.add_pipeline(slug, repository="git@github.com:acme/app.git")
    policy = write_policy(tmp_path, POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=policy) as client:
        yield client


async def finish(bot: BotClient, slug: str, number: int, state: str = "passed") -> None:
    bot.bk.set_build_state(slug, number, state)
    assert (await bot.webhook(bot.bk.webhook_payload(slug, number))).status == 200
    await bot.settled()


async def deployed(
    bot: BotClient, session: ClientSession, slug: str, commit: str, state: str = "passed"
) -> int:
    """An agent's deploy of `commit` on main, started and ended; its build number."""
    started = await structured(
        session, "deploy", pipeline=slug, branch="main", commit=commit, idempotency_key=commit
    )
    assert started["status"] == "started", started
    number = int(started["build"]["number"])
    await finish(bot, slug, number, state)
    return number


async def audit_entries(redis_client: Any) -> list[dict[str, str]]:
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


def creates(bk: FakeBuildkite, slug: str) -> list[Any]:
    return bk.requests_to("POST", BUILDS.format(slug))


async def test_the_ledger_tools_are_listed_with_truthful_hints(bot: BotClient) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    for name in ("deployments", "rollback", "promote"):
        tool = tools[name]
        assert tool.description and tool.output_schema and tool.annotations
        for arg, prop in tool.input_schema["properties"].items():
            assert prop.get("description"), f"{name}.{arg} has no description"
        assert tool.input_schema["required"] == ["pipeline"]
        assert tool.annotations.idempotent_hint is True
        assert tool.annotations.destructive_hint is False
    assert tools["deployments"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert tools["rollback"].annotations.read_only_hint is False  # type: ignore[union-attr]
    assert tools["promote"].annotations.read_only_hint is False  # type: ignore[union-attr]
    assert set(tools["rollback"].input_schema["properties"]) == {
        "pipeline",
        "to_build",
        "idempotency_key",
    }
    assert set(tools["promote"].input_schema["properties"]) == {"pipeline", "idempotency_key"}
    assert tools["deployments"].input_schema["properties"]["limit"]["maximum"] == 50
    # The result's shape is deploy's.
    assert tools["rollback"].output_schema == tools["deploy"].output_schema


async def test_deployments_returns_the_history_and_what_is_live_from_redis_only(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        await deployed(bot, session, "web", SHA1)
        await deployed(bot, session, "web", SHA2, state="failed")
        running = await structured(
            session, "deploy", pipeline="web", branch="main", commit=SHA3, idempotency_key="r"
        )
        assert running["status"] == "started"
        await bot.settled()
        asked = len(work_requests(bk))
        seen = await structured(session, "deployments", pipeline="web", limit=2)
        empty = await structured(session, "deployments", pipeline="staging-deploy")
        bad = await call(session, "deployments", pipeline="web", limit=500)
    assert len(work_requests(bk)) == asked  # Redis only
    assert seen["pipeline"] == "web"
    assert seen["live"]["number"] == 1 and seen["live"]["commit"] == SHA1
    assert seen["live"]["outcome"] == "passed" and seen["live"]["source"] == "bot"
    assert seen["live"]["requested_by"] == "agent:captain"
    assert seen["live"]["started_at"].endswith("+00:00")
    assert [d["number"] for d in seen["deployments"]] == [3, 2]  # newest first, limit 2
    assert [d["outcome"] for d in seen["deployments"]] == ["running", "failed"]
    assert [d["number"] for d in seen["running"]] == [3]
    assert "frozen" not in seen and "locked_by" not in seen
    assert empty == {"pipeline": "staging-deploy", "running": [], "deployments": []}
    assert "limit" in error_text(bad)


async def test_a_rollback_goes_through_the_core_once_and_is_audited(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        await deployed(bot, session, "web", SHA1)
        await deployed(bot, session, "web", SHA2)
        first = await structured(session, "rollback", pipeline="web", idempotency_key="rb-1")
        again = await structured(session, "rollback", pipeline="web", idempotency_key="rb-1")
        await finish(bot, "web", 3)
        live = await structured(session, "rollback", pipeline="web", to_build=3)
    assert first["status"] == "started" and again == first
    assert first["build"]["number"] == 3 and first["build"]["commit"] == SHA1
    *_, create = creates(bk, "web")
    assert len(creates(bk, "web")) == 3  # two deploys and one rollback, retried once
    assert create.json["commit"] == SHA1 and create.json["branch"] == "main"
    assert create.json["meta_data"]["chatops_rollback_of"] == "2"
    assert create.json["meta_data"]["chatops_requested_by"] == "agent:captain"
    key = keys.DEPLOYMENT_KEY.format(pipeline="web", number=3)
    rolled = json.loads(await redis_client.get(key))
    assert rolled["rb"] == 2 and rolled["o"] == "passed" and rolled["r"] == "agent:captain"
    assert create.json["message"] == "Rollback of #2 to #1 by agent captain over MCP"
    # People see in the history who asked: the agent, by name, never as a mention.
    _, name, _ = await bot.command("/deploy", "history web")
    replies = await slack.wait_for(lambda: [p for p in slack.responses if p.name == name])
    history = json.dumps(replies[-1].json.get("blocks"))
    assert "by agent `captain`" in history and "<@agent:" not in history
    # Build #3 is live now: refused, with the core's reason as a plain sentence.
    assert live["status"] == "refused" and "#3 is what is live" in live["reason"]
    assert "reference" in live["reason"] and "`" in live["reason"]
    # Its message is in the agent's channel, so people see what agents do.
    said = json.dumps([c.args for c in slack.posts(CHANNEL)])
    assert "agent `captain`" in said
    trail = [e for e in await audit_entries(redis_client) if e.get("action") == "mcp rollback"]
    assert [e["outcome"] for e in trail] == ["started", "repeated", "refused"]
    assert all(e["user"] == "agent:captain" and "for U0USER" in e["detail"] for e in trail)


async def test_rollback_and_promote_are_denied_without_a_grant_or_a_target(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    async with agent_session(bot, INTRUDER_TOKEN) as intruder:
        denied = await structured(intruder, "rollback", pipeline="web")
        promoted = await structured(intruder, "promote", pipeline="prod-lite")
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        nothing = await structured(session, "rollback", pipeline="web")
        no_rule = await structured(session, "promote", pipeline="web")
        not_live = await structured(session, "promote", pipeline="prod-lite")
    assert denied["status"] == promoted["status"] == "refused"
    assert "not allowed" in denied["reason"].lower() or "may not" in denied["reason"].lower()
    assert nothing["status"] == "refused"
    assert "`web` has no passed deployment in the ledger" in nothing["reason"]
    assert no_rule["status"] == "refused" and "promote_from" in no_rule["reason"]
    assert not_live["status"] == "refused" and "staging-deploy" in not_live["reason"]
    assert mutations(bk) == []


async def test_promote_deploys_the_commit_live_on_the_source(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        await deployed(bot, session, "staging-deploy", SHA1)
        await deployed(bot, session, "staging-deploy", SHA2, state="failed")
        done = await structured(session, "promote", pipeline="prod-lite")
    assert done["status"] == "started" and done["build"]["commit"] == SHA1
    (create,) = creates(bk, "prod-lite")
    assert create.json["commit"] == SHA1
    assert create.json["message"].endswith("by agent captain over MCP")
    assert create.json["meta_data"]["chatops_requested_by"] == "agent:captain"


async def test_a_protected_rollback_waits_for_a_person_other_than_the_agents(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    for commit in (SHA1, SHA2):
        bk.add_build("deploy-prod", commit=commit, state="passed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        asked = await structured(session, "rollback", pipeline="deploy-prod")
        assert asked["status"] == "awaiting_approval" and "build" not in asked
        assert mutations(bk) == []
        post = await slack.wait_for(
            lambda: [c for c in slack.posts(CHANNEL) if "asks to roll back" in c.args["text"]]
        )
        assert (
            "agent `captain` (acting for <@U0USER>) asks to roll back `deploy-prod` from #2"
            in (post[0].args["text"])
        )
        assert "<@U0BOB>" in post[0].args["text"]
        ts = post[0].response["ts"]
        blocks = slack.message(CHANNEL, ts)["blocks"]
        approve = next(
            str(e["value"])
            for b in blocks
            for e in b.get("elements", [])
            if e.get("action_id") == "approval_approve"
        )
        waiting = asyncio.create_task(
            structured(
                session, "wait_for_request", request_id=asked["request_id"], timeout_seconds=30
            )
        )
        _, ok = await bot.click(
            "approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=BOB
        )
        done = await asyncio.wait_for(waiting, 30)
    assert "Started" in (await slack.wait_for(lambda: bot.response_texts(ok)))[0]
    assert done["status"] == "approved" and done["build"]["number"] == 3
    (create,) = creates(bk, "deploy-prod")
    assert create.json["commit"] == SHA1
    assert create.json["meta_data"]["chatops_rollback_of"] == "2"
    assert create.json["meta_data"]["chatops_approved_by"] == BOB


async def test_rollback_spends_a_mutation_and_deployments_a_read(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    async with agent_session(bot, THRIFTY_TOKEN) as session:
        await deployed(bot, session, "web", SHA1)  # its one mutation this hour
        spent = await structured(session, "rollback", pipeline="web")
        reads = [await call(session, "deployments", pipeline="web") for _ in range(3)]
    assert spent["status"] == "refused" and "try again" in spent["reason"]
    assert [r.is_error for r in reads] == [False, False, True]
    assert "try again" in error_text(reads[2])
    assert len(creates(bk, "web")) == 1


async def test_a_freeze_refuses_an_agents_deploy_rebuild_and_rollback_with_no_break_glass(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    bk.add_build("frozen-app", state="failed", commit=SHA1)
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        deploy = await structured(session, "deploy", pipeline="frozen-app")
        rebuild = await structured(session, "rebuild_build", pipeline="frozen-app", number=1)
        retry = await structured(session, "retry_failed_jobs", pipeline="frozen-app", number=1)
        rollback = await structured(session, "rollback", pipeline="frozen-app")
        checked = await structured(session, "check_policy", action="deploy", pipeline="frozen-app")
        cancel = await structured(session, "check_policy", action="cancel", pipeline="frozen-app")
        ledger = await structured(session, "deployments", pipeline="frozen-app")
    for refused in (deploy, rebuild, retry, rollback):
        assert refused["status"] == "refused", refused
        reason = refused["reason"]
        assert "`frozen-app` is frozen: `audit freeze`" in reason and "until" in reason
        assert "An agent cannot break the glass" in reason
        assert "--break-glass <reason>" not in reason
    # Each names the action refused.
    assert "The retry of the failed jobs was not started" in retry["reason"]
    assert "The rollback was not started" in rollback["reason"]
    assert mutations(bk) == []
    assert checked["allowed"] is False and checked["frozen_until"].startswith("2099-01-01T00:00")
    assert "frozen: `audit freeze`" in checked["reason"]
    assert "would not be started" in checked["reason"]
    assert cancel["allowed"] is True and "frozen_until" not in cancel
    assert ledger["frozen"]["reason"] == "audit freeze"
    assert ledger["frozen"]["ends_at"].startswith("2099-01-01T00:00")
    trail = await audit_entries(redis_client)
    assert any(e.get("detail") == "freeze: audit freeze" for e in trail)


async def test_check_policy_dry_runs_a_rollback_and_a_promotion_from_the_ledger(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    async with agent_session(bot, CAPTAIN_TOKEN) as session:

        async def check(action: str, pipeline: str) -> dict[str, Any]:
            return await structured(session, "check_policy", action=action, pipeline=pipeline)

        nothing = await check("rollback", "web")
        await deployed(bot, session, "web", SHA1)
        only_one = await check("rollback", "web")
        await deployed(bot, session, "web", SHA2)
        no_source = await check("promote", "web")
        nothing_live = await check("promote", "prod-lite")
        await deployed(bot, session, "staging-deploy", SHA3)
        await bot.settled()
        asked, posted = len(work_requests(bk)), len(slack.posts(CHANNEL))
        rollback = await check("rollback", "web")
        promote = await check("promote", "prod-lite")
        frozen = [await check(a, "frozen-app") for a in ("rollback", "promote")]
        protected = await check("rollback", "deploy-prod")
        await bot.command("/deploy", "lock web hotfix in progress")
        await bot.settled()
        locked = await check("rollback", "web")
    assert nothing["allowed"] is False and "no passed deployment in the ledger" in nothing["reason"]
    assert only_one["allowed"] is False and "Nothing to roll back to: #1" in only_one["reason"]
    assert "Nothing would be started." in only_one["reason"]
    assert no_source["allowed"] is False and "no `promote_from`" in no_source["reason"]
    assert nothing_live["allowed"] is False
    assert "Nothing is live on `staging-deploy`" in nothing_live["reason"]
    # What the real action would deploy, said beforehand; and the dry runs changed nothing.
    assert rollback["allowed"] is True and rollback["needs_approval"] is False
    assert f"deploy again {SHA1[:12]} of main from #1" in rollback["reason"]
    assert promote["allowed"] is True
    assert f"deploy {SHA3[:12]} of main, live on staging-deploy as #1" in promote["reason"]
    for refused, noun in zip(frozen, ("rollback", "promotion"), strict=True):
        assert refused["allowed"] is False and refused["frozen_until"].startswith("2099-01-01")
        assert f"The {noun} would not be started." in refused["reason"]
        assert "An agent cannot break the glass" in refused["reason"]
    # A rollback is a deploy: on a protected pipeline a person approves it (nothing live yet).
    assert protected["needs_approval"] is True and protected["approvers"] == [BOB]
    assert protected["allowed"] is False and "no passed deployment" in protected["reason"]
    assert locked["allowed"] is False and locked["locked_by"] == ALICE
    assert "hotfix in progress" in locked["reason"]
    await bot.settled()
    assert len(slack.posts(CHANNEL)) == posted
    assert len(work_requests(bk)) == asked  # the ledger only: no Buildkite request
    assert len(creates(bk, "web")) == 2


async def test_a_requester_known_only_from_meta_data_is_marked_unverified(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    """After `ledger rebuild`, who asked is only the builds' meta_data's word: the agent is told
    so, as /deploy history tells a person; the bot's own record carries no such mark."""
    meta = {"chatops_source": "slack", "chatops_requested_by": BOB}
    bk.add_build("deploy-prod", commit=SHA1, state="passed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        await deployed(bot, session, "web", SHA2)
        rebuilt = await structured(session, "deployments", pipeline="deploy-prod")
        own = await structured(session, "deployments", pipeline="web")
    assert rebuilt["live"]["requested_by"] == BOB
    assert rebuilt["live"]["requester_unverified"] is True
    assert own["live"]["requested_by"] == "agent:captain"
    assert own["live"].get("requester_unverified", False) is False


async def test_check_policy_writes_nothing_to_the_ledger(bot: BotClient, redis_client: Any) -> None:
    """A dry run reads the ledger without the index's housekeeping (forgetting an entry that
    expired): the ledger's keys are as they were. A real read then does forget it."""
    index = keys.LEDGER_KEY.format(pipeline="web")
    async with agent_session(bot, CAPTAIN_TOKEN) as session:
        await deployed(bot, session, "web", SHA1)
        await redis_client.zadd(index, {"99": 99})  # its entry expired: the index still has it

        async def ledger_keys() -> dict[bytes, Any]:
            found = [k async for k in redis_client.scan_iter(match=b"*ledger*")]
            return {k: await redis_client.dump(k) for k in sorted(found)}

        before = await ledger_keys()
        for action in ("rollback", "promote"):
            await structured(session, "check_policy", action=action, pipeline="web")
        assert await ledger_keys() == before
        await structured(session, "deployments", pipeline="web")
    assert await redis_client.zscore(index, "99") is None
