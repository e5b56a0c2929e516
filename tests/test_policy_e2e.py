"""The deploy policy end to end: refusals, confirmations, approvals, locks, audit, hardening."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot, work_requests
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys

CHANNEL = "C0CHAN"  # "#deploys" in the fake
ALICE, BOB, CAROL, MALLORY = "U0USER", "U0BOB", "U0CAROL", "U0MAL"
BUILDS = "/organizations/acme/pipelines/{}/builds"

POLICY = """\
admins: [U0ADMIN]
default:
  deployers: [U0USER, S0SRE]
pipelines:
  deploy-prod:
    channels: ["#deploys"]
    deployers: [U0USER, U0BOB, U0CAROL]
    protected: true
    approval:
      approvers: [S0APPROVERS]
      expires_after: 2s
  staging:
    channels: ["#deploys"]
    deployers: [U0USER, S0SRE]
    protected: true
  secret-pipeline:
    deployers: [U0ADMIN]
"""


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_user(CAROL, "carol", "carol@example.com")
    slack.add_user(MALLORY, "mallory", "mallory@example.com")
    slack.add_usergroup("S0SRE", [MALLORY])
    slack.add_usergroup("S0APPROVERS", [BOB, ALICE])
    for slug in ("deploy-prod", "staging", "web", "secret-pipeline"):
        bk.add_pipeline(slug, repository=f"git@github.com:acme/{slug}.git")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as client:
        yield client


def mutations(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]


async def answer(bot: BotClient, command: str, text: str, **kwargs: Any) -> dict[str, Any]:
    _, name, _ = await bot.command(command, text, **kwargs)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return posts[-1].json


async def audit_entries(redis_client: Any) -> list[dict[str, str]]:
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


def value_of(blocks: list[dict[str, Any]], action_id: str) -> str:
    for block in blocks:
        for element in block.get("elements", []):
            if element.get("action_id") == action_id:
                return str(element["value"])
    raise AssertionError(f"no {action_id} in {blocks}")


# -- refusals ------------------------------------------------------------------------------


async def test_a_user_outside_the_rule_is_refused_with_who_may(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    reply = await answer(bot, "/deploy", "web", user_id=CAROL, user_name="carol")
    assert reply["response_type"] == "ephemeral"
    assert "You may not deploy `web`: policy rule `default` allows it to" in reply["text"]
    assert "<@U0USER>" in reply["text"] and "<!subteam^S0SRE>" in reply["text"]
    assert mutations(bk) == []
    (entry,) = await audit_entries(redis_client)
    assert entry["user"] == CAROL and entry["action"] == "deploy" and entry["outcome"] == "refused"
    assert entry["pipeline"] == "web" and entry["channel"] == CHANNEL


async def test_a_user_group_member_may_deploy(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    reply = await answer(bot, "/deploy", "web", user_id=MALLORY, user_name="mallory")
    assert "Started" in reply["text"]
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 1
    assert slack.calls_to("usergroups.users.list")[0].args["usergroup"] == "S0SRE"


async def test_the_wrong_channel_is_refused(bot: BotClient, bk: FakeBuildkite) -> None:
    reply = await answer(bot, "/deploy", "staging", channel_id="C0OTHER", channel_name="random")
    assert "`staging` may only be driven from #deploys (policy rule `staging`)" in reply["text"]
    assert mutations(bk) == []


async def test_cancel_and_rebuild_are_checked_too(bot: BotClient, bk: FakeBuildkite) -> None:
    bk.add_build("secret-pipeline", state="running")
    cancel = await answer(bot, "/cancel", "secret-pipeline 1")
    rebuild = await answer(bot, "/rebuild", "secret-pipeline 1")
    assert "You may not cancel `secret-pipeline`" in cancel["text"]
    assert "You may not rebuild `secret-pipeline`" in rebuild["text"]
    assert mutations(bk) == []


async def test_a_forged_button_naming_another_pipeline_is_refused(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_build("secret-pipeline", state="running")
    forged = json.dumps({"pipeline": "secret-pipeline", "number": 1})
    _, name = await bot.click("build_cancel", forged, channel=CHANNEL, message_ts="1.000001")
    texts = await bot.slack.wait_for(lambda: bot.response_texts(name))
    assert "You may not cancel `secret-pipeline`" in texts[0]
    for bad in (
        '{"pipeline": "../x", "number": 1}',
        '{"pipeline": "web", "number": 1, "x": 1}',
        "not json",
        '{"pipeline": "web", "number": -3}',
    ):
        _, name = await bot.click("build_rebuild", bad, channel=CHANNEL, message_ts="1.000001")
        texts = await bot.slack.wait_for(partial(bot.response_texts, name))
        assert "This button's data is not valid" in texts[0]
    assert mutations(bk) == []


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("/deploy", "../deploy-prod"),
        ("/deploy", "deploy-prod%2F..%2Fsecret"),
        ("/deploy", "web/../../secret-pipeline"),
        ("/deploy", "web ../../etc/passwd"),
        ("/deploy", "web main..x"),
        ("/deploy", "web main 12345"),
        ("/deploy", "web ref/../x"),
        ("/deploy", "lock ../x"),
        ("/deploy", "audit a/b"),
        ("/cancel", "web/.. 1"),
        ("/cancel", "web 1/../2"),
        ("/cancel", "https://buildkite.com/acme/web%2F..%2Fsecret/builds/1"),
        ("/rebuild", "https://buildkite.com/acme/../secret-pipeline/builds/1"),
    ],
)
async def test_path_injection_in_any_argument_is_refused(
    bot: BotClient, bk: FakeBuildkite, command: str, text: str
) -> None:
    resp, _, ack = await bot.command(command, text)
    assert resp.status == 200
    assert "*Usage:*" in ack["text"] or "not" in ack["text"]
    await asyncio.sleep(0.05)
    assert work_requests(bk) == []


# -- protected pipelines --------------------------------------------------------------------


async def test_protected_deploy_asks_for_confirmation_with_sha_and_diff(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build("staging", commit="1" * 40, state="passed")
    bk.add_build("staging", commit="2" * 40, state="failed")
    reply = await answer(bot, "/deploy", "staging")
    text = reply["text"] + json.dumps(reply.get("blocks"))
    assert "`staging` is protected" in json.dumps(reply["blocks"])
    assert "last built as `222222222222` in #2" in text
    assert f"https://github.com/acme/staging/compare/{'1' * 40}...{'2' * 40}" in text
    assert bk.requests_to("POST") == []

    # Only the requester may confirm; someone else's click does nothing.
    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, other = await bot.click(
        "deploy_confirm",
        confirm,
        channel=CHANNEL,
        message_ts="1.1",
        ephemeral=True,
        user_id=MALLORY,
    )
    assert (
        "Only <@U0USER>, who asked, can confirm"
        in (await slack.wait_for(lambda: bot.response_texts(other)))[0]
    )
    assert bk.requests_to("POST") == []

    _, name = await bot.click(
        "deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    texts = await slack.wait_for(lambda: bot.response_texts(name))
    assert "Started" in texts[0]
    (create,) = bk.requests_to("POST", BUILDS.format("staging"))
    assert create.json["commit"] == "HEAD" and create.json["branch"] == "main"
    assert create.json["author"] == {"name": "Alice", "email": "alice@example.com"}
    assert create.json["meta_data"]["chatops_requested_by"] == ALICE
    # A second click on the same confirmation starts nothing more.
    _, again = await bot.click(
        "deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    assert (
        "expired or was already used"
        in (await slack.wait_for(lambda: bot.response_texts(again)))[0]
    )
    assert len(bk.requests_to("POST")) == 1


async def test_the_last_build_look_up_reads_past_an_odd_build(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_build("staging", commit="1" * 40, state="passed")
    bk.add_build("staging", commit="2" * 40, state="failed", author="dev@example.com")
    odd = bk.add_build("staging", commit="3" * 40, state="failed")
    odd["number"] = None  # one build Buildkite lists that cannot be read
    reply = await answer(bot, "/deploy", "staging")
    text = reply["text"] + json.dumps(reply.get("blocks"))
    assert "last built as `222222222222` in #2" in text
    assert f"https://github.com/acme/staging/compare/{'1' * 40}...{'2' * 40}" in text


async def test_protected_deploy_can_be_called_off(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    reply = await answer(bot, "/deploy", "staging")
    value = value_of(reply["blocks"], "deploy_abort")
    _, name = await bot.click(
        "deploy_abort", value, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    assert "nothing was started" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    _, late = await bot.click(
        "deploy_confirm", value, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    await slack.wait_for(lambda: bot.response_texts(late))
    assert bk.requests_to("POST") == []


async def _request_approval(bot: BotClient, slack: FakeSlack) -> tuple[str, str]:
    reply = await answer(bot, "/deploy", "deploy-prod main")
    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, name = await bot.click(
        "deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    assert "Approval requested" in (await slack.wait_for(lambda: bot.response_texts(name)))[0]
    post = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to deploy" in c.args["text"]]
    )
    ts = post[0].response["ts"]
    return ts, value_of(slack.message(CHANNEL, ts)["blocks"], "approval_approve")


async def test_approval_by_another_person_starts_the_deploy(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    ts, value = await _request_approval(bot, slack)
    assert bk.requests_to("POST") == []

    _, own = await bot.click("approval_approve", value, channel=CHANNEL, message_ts=ts)
    assert (
        "You cannot approve your own deploy"
        in (await slack.wait_for(lambda: bot.response_texts(own)))[0]
    )
    _, stranger = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=CAROL
    )
    assert (
        "Only <!subteam^S0APPROVERS> may approve"
        in (await slack.wait_for(lambda: bot.response_texts(stranger)))[0]
    )
    assert bk.requests_to("POST") == []

    _, ok = await bot.click("approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB)
    assert "Approved. Started" in (await slack.wait_for(lambda: bot.response_texts(ok)))[0]
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
    assert create.json["meta_data"]["chatops_approved_by"] == BOB
    assert create.json["author"]["email"] == "alice@example.com"  # credited to the requester
    await slack.wait_for(lambda: "was approved by <@U0BOB>" in slack.message(CHANNEL, ts)["text"])
    # The build is followed in the approval's thread.
    await slack.wait_for(lambda: slack.thread(CHANNEL, ts))
    _, twice = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "already approved" in (await slack.wait_for(lambda: bot.response_texts(twice)))[0]
    assert len(bk.requests_to("POST")) == 1
    outcomes = [(e["user"], e["action"], e["outcome"]) for e in await audit_entries(redis_client)]
    assert (ALICE, "approve", "refused") in outcomes
    assert (CAROL, "approve", "refused") in outcomes
    assert (BOB, "approve", "approved") in outcomes
    assert (ALICE, "deploy", "started") in outcomes


async def test_rejection_starts_nothing(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    ts, value = await _request_approval(bot, slack)
    _, name = await bot.click("approval_reject", value, channel=CHANNEL, message_ts=ts, user_id=BOB)
    await slack.wait_for(lambda: bot.response_texts(name))
    await slack.wait_for(lambda: "was rejected by <@U0BOB>" in slack.message(CHANNEL, ts)["text"])
    assert bk.requests_to("POST") == []


async def test_an_approval_expires(bot: BotClient, bk: FakeBuildkite, slack: FakeSlack) -> None:
    ts, value = await _request_approval(bot, slack)
    await slack.wait_for(
        lambda: "expired before anyone approved" in slack.message(CHANNEL, ts)["text"], timeout=10
    )
    assert "approval_approve" not in json.dumps(slack.message(CHANNEL, ts)["blocks"])
    _, late = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "already expired" in (await slack.wait_for(lambda: bot.response_texts(late)))[0]
    assert bk.requests_to("POST") == []


async def test_approval_survives_a_restart(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_usergroup("S0APPROVERS", [BOB])
    bk.add_pipeline("deploy-prod")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY.replace("expires_after: 2s", "expires_after: 10m"))
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as first:
        ts, value = await _request_approval(first, slack)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as second:
        _, ok = await second.click(
            "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB
        )
        await slack.wait_for(lambda: second.response_texts(ok))
    assert len(bk.requests_to("POST", BUILDS.format("deploy-prod"))) == 1


# -- locks ---------------------------------------------------------------------------------


async def test_lock_refuses_others_until_unlocked(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    locked = await answer(bot, "/deploy", "lock web release freeze")
    assert locked["response_type"] == "in_channel"
    assert "<@U0USER> locked `web` until unlocked: release freeze" in locked["text"]

    refused = await answer(bot, "/deploy", "web", user_id=MALLORY)
    assert "`web` is locked by <@U0USER> (release freeze)" in refused["text"]
    assert bk.requests_to("POST") == []
    listing = await answer(bot, "/deploy", "locks", user_id=MALLORY)
    assert "`web` by <@U0USER>: release freeze" in listing["text"]

    not_theirs = await answer(bot, "/deploy", "unlock web", user_id=MALLORY)
    assert "Only <@U0USER>, who locked `web`, or an admin can unlock it" in not_theirs["text"]
    mine = await answer(bot, "/deploy", "web")  # the holder may still deploy
    assert "Started" in mine["text"]
    unlocked = await answer(bot, "/deploy", "unlock web")
    assert "unlocked `web`" in unlocked["text"]
    now_ok = await answer(bot, "/deploy", "web", user_id=MALLORY)
    assert "Started" in now_ok["text"]
    assert len(bk.requests_to("POST")) == 2


async def test_a_lock_can_expire(bot: BotClient, redis_client: Any) -> None:
    locked = await answer(bot, "/deploy", "lock web 1s")
    assert "locked `web` for 1s" in locked["text"]
    ttl = await redis_client.pttl(keys.PIPELINE_LOCK_KEY.format(pipeline="web"))
    # At most a second left, or none (-2) if this process stalled that long since: never
    # a lock without an expiry (-1).
    assert ttl <= 1000 and ttl != -1, ttl
    await asyncio.sleep(1.2)
    assert "No pipeline is locked" in (await answer(bot, "/deploy", "locks"))["text"]


# -- the audit trail -----------------------------------------------------------------------


async def test_audit_shows_allowed_and_refused_attempts_to_those_allowed(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    await answer(bot, "/deploy", "web")
    await answer(bot, "/deploy", "web", user_id=CAROL)
    shown = await answer(bot, "/deploy", "audit web")
    text = shown["text"]
    assert "Last 2 audited actions for `web`" in text
    assert "<@U0CAROL> deploy `web` in <#C0CHAN>: *refused*" in text
    assert "<@U0USER> deploy `web #1` in <#C0CHAN>: *started*" in text
    assert "https://buildkite.com/acme/web/builds/1" in text
    refused = await answer(bot, "/deploy", "audit web", user_id=CAROL)
    assert "Only admins and those who may deploy `web` can see its audit trail" in refused["text"]
    everything = await answer(bot, "/deploy", "audit")
    assert "Only admins can see the whole audit trail" in everything["text"]
    admin = await answer(bot, "/deploy", "audit", user_id="U0ADMIN")
    assert "Last 2 audited actions" in admin["text"]
