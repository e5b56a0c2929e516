"""The deploy policy holds when decisions take effect: approvals re-checked, rebuilds of protected
pipelines asked like deploys, confirmations dropped only by their requester, and env shown in full
or refused. Played through the bot's HTTP port; asserted on what reached the fakes."""

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
from tests.test_policy_e2e import (
    ALICE,
    BOB,
    BUILDS,
    CAROL,
    CHANNEL,
    MALLORY,
    answer,
    audit_entries,
    mutations,
    value_of,
)

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
      expires_after: 10m
  staging:
    channels: ["#deploys"]
    deployers: [U0USER, S0SRE]
    protected: true
    env:
      allow: ["APP_*", "FEATURE_?"]
      deny: ["APP_SECRET*"]
  gated:
    approval:
      approvers: [S0APPROVERS]
"""

ORIGINAL_COMMIT = "a" * 40
ZWSP_AFTER_BACKTICK = "`\u200b"


async def start_bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path, policy: str = POLICY
) -> Any:
    path = tmp_path / "policy.yml"
    path.write_text(policy)
    return running_bot(slack, bk, redis_url, policy_file=str(path))


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_user(CAROL, "carol", "carol@example.com")
    slack.add_user(MALLORY, "mallory", "mallory@example.com")
    slack.add_usergroup("S0SRE", [MALLORY])
    slack.add_usergroup("S0APPROVERS", [BOB, ALICE])
    for slug in ("deploy-prod", "staging", "web", "gated"):
        bk.add_pipeline(slug, repository=f"git@github.com:acme/{slug}.git")
    async with await start_bot(slack, bk, redis_url, tmp_path) as client:
        yield client


async def texts_of(bot: BotClient, name: str) -> list[str]:
    return await bot.slack.wait_for(lambda: bot.response_texts(name))


async def ask_approval(bot: BotClient, slack: FakeSlack, command: str, text: str) -> str:
    """Run the command as Alice, confirm it, and return the approval message's ts."""
    reply = await answer(bot, command, text)
    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, name = await bot.click("deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1")
    assert "Approval requested" in (await texts_of(bot, name))[0]
    post = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to" in c.args["text"]]
    )
    return str(post[-1].response["ts"])


def approve_value(slack: FakeSlack, ts: str) -> str:
    return value_of(slack.message(CHANNEL, ts)["blocks"], "approval_approve")


# -- decisions re-checked when they take effect ----------------------------------------------


async def test_a_lock_taken_while_an_approval_waits_stops_the_approval(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    ts = await ask_approval(bot, slack, "/deploy", "deploy-prod main")
    value = approve_value(slack, ts)
    locked = await answer(bot, "/deploy", "lock deploy-prod incident <b>&", user_id=CAROL)
    assert "locked `deploy-prod`" in locked["text"]

    _, name = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    (text,) = await texts_of(bot, name)
    assert "not started" in text and "is locked by <@U0CAROL>" in text
    assert mutations(bk) == []
    # The approval message itself says why, and offers no more buttons.
    await slack.wait_for(lambda: "but not started" in slack.message(CHANNEL, ts)["text"])
    shown = json.dumps(slack.message(CHANNEL, ts)["blocks"])
    assert "is locked by <@U0CAROL> (incident &lt;b&gt;&amp;)" in shown
    assert "approval_approve" not in shown
    _, again = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "already refused" in (await texts_of(bot, again))[0]
    assert mutations(bk) == []
    outcomes = [(e["user"], e["action"], e["outcome"]) for e in await audit_entries(redis_client)]
    assert (BOB, "approve", "refused") in outcomes


async def test_an_approval_for_a_deleted_pipeline_starts_nothing(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    ts = await ask_approval(bot, slack, "/deploy", "deploy-prod main")
    del bk.pipelines["deploy-prod"]
    _, name = await bot.click(
        "approval_approve", approve_value(slack, ts), channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "no longer exists" in (await texts_of(bot, name))[0]
    assert mutations(bk) == []
    await slack.wait_for(lambda: "no longer exists" in json.dumps(slack.message(CHANNEL, ts)))


async def test_a_policy_changed_while_an_approval_waits_is_applied(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_usergroup("S0APPROVERS", [BOB])
    bk.add_pipeline("deploy-prod")
    async with await start_bot(slack, bk, redis_url, tmp_path) as first:
        ts = await ask_approval(first, slack, "/deploy", "deploy-prod main")
    # Alice is no longer a deployer of deploy-prod when Bob approves.
    stricter = POLICY.replace("deployers: [U0USER, U0BOB, U0CAROL]", "deployers: [U0CAROL]")
    async with await start_bot(slack, bk, redis_url, tmp_path, stricter) as second:
        _, name = await second.click(
            "approval_approve",
            approve_value(slack, ts),
            channel=CHANNEL,
            message_ts=ts,
            user_id=BOB,
        )
        # (response_url names restart with each client: pick this click's answer by its text)
        (text,) = await second.slack.wait_for(
            lambda: [t for t in second.response_texts(name) if "not started" in t]
        )
    assert "<@U0USER> may no longer deploy `deploy-prod`" in text
    assert "policy rule `deploy-prod`" in text
    assert mutations(bk) == []


async def test_a_rule_with_approval_asks_even_without_protected(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    ts = await ask_approval(bot, slack, "/deploy", "gated main")
    assert mutations(bk) == []
    _, ok = await bot.click(
        "approval_approve", approve_value(slack, ts), channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "Approved. Started" in (await texts_of(bot, ok))[0]
    assert bk.build("gated", 1)["meta_data"]["chatops_approved_by"] == BOB


# -- a rebuild of a protected pipeline is a deploy -------------------------------------------


async def test_a_protected_rebuild_is_confirmed_approved_and_truthfully_recorded(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build(
        "deploy-prod",
        state="failed",
        commit=ORIGINAL_COMMIT,
        branch="release",
        message="Release 7",
        meta_data={"chatops_requested_by": CAROL, "chatops_approved_by": "U0OLDAPPROVER"},
        env={"APP_MODE": "blue"},
    )
    reply = await answer(bot, "/rebuild", "deploy-prod 1")
    shown = json.dumps(reply["blocks"])
    assert "Rebuild this?" in shown and "*Rebuild of:* #1" in shown
    assert "APP_MODE=blue" in shown and ORIGINAL_COMMIT in shown
    assert mutations(bk) == []  # nothing started before confirmation and approval

    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, name = await bot.click("deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1")
    assert "Approval requested" in (await texts_of(bot, name))[0]
    post = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to rebuild" in c.args["text"]]
    )
    ts = str(post[0].response["ts"])
    assert mutations(bk) == []

    _, ok = await bot.click(
        "approval_approve", approve_value(slack, ts), channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "Approved. Started" in (await texts_of(bot, ok))[0]
    # A new build of the same commit, branch and env, never Buildkite's rebuild (which would
    # copy the original's meta_data, and its approver, to the new build).
    assert [r.method for r in mutations(bk)] == ["POST"]
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
    assert create.json["commit"] == ORIGINAL_COMMIT and create.json["branch"] == "release"
    assert create.json["env"] == {"APP_MODE": "blue"}
    new = bk.build("deploy-prod", 2)
    assert new["meta_data"]["chatops_approved_by"] == BOB
    assert new["meta_data"]["chatops_requested_by"] == ALICE
    assert "rebuilt_from" not in new or not new["rebuilt_from"]


async def test_the_rebuild_button_on_a_protected_pipeline_asks_first(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_build(
        "staging",
        state="passed",
        commit=ORIGINAL_COMMIT,
        meta_data={"chatops_approved_by": "U0OLDAPPROVER"},
    )
    value = json.dumps({"pipeline": "staging", "number": 1})
    _, name = await bot.click("build_rebuild", value, channel=CHANNEL, message_ts="1.000001")
    (post,) = await slack.wait_for(lambda: [p for p in slack.responses if p.name == name])
    assert post.json["response_type"] == "ephemeral"
    assert "`staging` is protected. Rebuild this?" in json.dumps(post.json["blocks"])
    assert mutations(bk) == []

    confirm = value_of(post.json["blocks"], "deploy_confirm")
    _, ok = await bot.click("deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1")
    assert "Started" in (await texts_of(bot, ok))[0]
    assert [r.method for r in mutations(bk)] == ["POST"]
    new = bk.build("staging", 2)
    assert new["commit"] == ORIGINAL_COMMIT
    assert "chatops_approved_by" not in new["meta_data"]  # nobody approved this one
    assert new["meta_data"]["chatops_requested_by"] == ALICE


async def test_an_unprotected_rebuild_stays_a_plain_rebuild(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="failed")
    reply = await answer(bot, "/rebuild", "web 1")
    assert "Started" in reply["text"]
    assert [r.method for r in mutations(bk)] == ["PUT"]
    assert mutations(bk)[0].path.endswith(BUILDS.format("web") + "/1/rebuild")


# -- only the requester drops their confirmation ------------------------------------------


async def test_only_the_requester_can_cancel_a_confirmation(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    reply = await answer(bot, "/deploy", "staging")
    value = value_of(reply["blocks"], "deploy_abort")
    _, other = await bot.click(
        "deploy_abort", value, channel=CHANNEL, message_ts="1.1", user_id=MALLORY
    )
    (post,) = await slack.wait_for(lambda: [p for p in slack.responses if p.name == other])
    assert post.json["response_type"] == "ephemeral"
    assert post.json.get("replace_original") is False
    assert "Only <@U0USER>, who asked, can cancel this deploy" in post.json["text"]
    assert await redis_client.keys(keys.DEPLOY_REQUEST_KEY.format(request_id="*"))

    # Still Alice's to confirm.
    _, ok = await bot.click("deploy_confirm", value, channel=CHANNEL, message_ts="1.1")
    assert "Started" in (await texts_of(bot, ok))[0]
    assert len(bk.requests_to("POST")) == 1


# -- what the approver sees is what is sent --------------------------------------------------


async def test_every_variable_is_shown_in_full_to_the_approver(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    env = {f"VAR_{i:02d}": f"{i:02d}" + "x" * 190 + "<&>`" for i in range(19)}
    env["BREAKOUT"] = "a```b<!channel>"
    words = " ".join(f"{k}={v}" for k, v in env.items())
    ts = await ask_approval(bot, slack, "/deploy", f"deploy-prod main {words}")
    blocks = slack.message(CHANNEL, ts)["blocks"]
    sections = [b["text"]["text"] for b in blocks if b["type"] == "section"]
    preformatted = "\n".join(t for t in sections if t.startswith("```"))
    for name, value in env.items():
        shown = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert f"{name}={shown}".replace("`", ZWSP_AFTER_BACKTICK) in preformatted
    # Backticks in values never close the preformatted blocks they sit in.
    for text in sections:
        if text.startswith("```"):
            assert text.count("```") == 2 and text.endswith("\n```")
    _, ok = await bot.click(
        "approval_approve", approve_value(slack, ts), channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    await texts_of(bot, ok)
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
    assert create.json["env"] == env


async def test_more_variables_than_can_be_shown_are_refused_before_anything_is_kept(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    words = " ".join(f"VAR_{i:02d}={'v' * 150}" for i in range(25)) + " LD_PRELOAD=/tmp/evil.so"
    reply = await answer(bot, "/deploy", f"deploy-prod main {words}")
    assert "26 environment variables is more than the 20" in reply["text"]
    assert await redis_client.keys(keys.DEPLOY_REQUEST_KEY.format(request_id="*")) == []
    assert mutations(bk) == []


async def test_values_too_long_or_escaping_badly_are_refused(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    long = await answer(bot, "/deploy", f"deploy-prod main NOTES={'n' * 201}")
    assert "The value of `NOTES` is 201 characters long; at most 200" in long["text"]
    # 20 values of 200 `&` are within the limits but would not fit one Slack message escaped.
    words = " ".join(f"V{i}={'&' * 200}" for i in range(20))
    wide = await answer(bot, "/deploy", f"deploy-prod main {words}")
    assert "too large to show in full" in wide["text"]
    assert await redis_client.keys(keys.DEPLOY_REQUEST_KEY.format(request_id="*")) == []
    assert mutations(bk) == []


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("LD_PRELOAD=/tmp/evil.so", "`LD_PRELOAD` may not be set from Slack"),
        ("ld_preload=/tmp/evil.so", "(built-in rule `LD_*`)"),
        ("BUILDKITE_AGENT_ACCESS_TOKEN=x", "(built-in rule `BUILDKITE_*`)"),
        ("PATH=/tmp", "(built-in rule `PATH`)"),
        ("BASH_ENV=/tmp/x", "(built-in rule `BASH_ENV`)"),
        ("GIT_CONFIG_GLOBAL=/tmp/x", "(built-in rule `GIT_CONFIG*`)"),
        ("NODE_OPTIONS=--require=/tmp/x", "(built-in rule `NODE_OPTIONS`)"),
        ("MODE=\x1b[2Jhidden", "contains a control or invisible character (U+001B)"),
        ("MODE=safe\u202eexe.txt", "(U+202E)"),
    ],
)
async def test_dangerous_env_never_reaches_buildkite(
    bot: BotClient, bk: FakeBuildkite, words: str, expected: str
) -> None:
    for pipeline in ("web", "deploy-prod"):
        reply = await answer(bot, "/deploy", f"{pipeline} main {words}")
        assert expected in reply["text"], reply["text"]
        assert "Nothing was started" in reply["text"]
    assert mutations(bk) == []


async def test_a_rules_env_allow_and_deny_lists_apply(bot: BotClient, bk: FakeBuildkite) -> None:
    denied = await answer(bot, "/deploy", "staging main APP_SECRET_KEY=x")
    assert (
        "`APP_SECRET_KEY` is refused by policy rule `staging` (env deny `APP_SECRET*`)"
        in (denied["text"])
    )
    other = await answer(bot, "/deploy", "staging main DEBUG=1")
    assert "`DEBUG` is not allowed by policy rule `staging`" in other["text"]
    assert "`APP_*`, `FEATURE_?`" in other["text"]
    assert mutations(bk) == []
    ok = await answer(bot, "/deploy", "staging main APP_MODE=1 feature_x=on")
    assert "`staging` is protected" in json.dumps(ok["blocks"])


async def test_a_protected_rebuild_of_a_build_with_denied_env_is_refused(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_build("staging", state="failed", env={"LD_PRELOAD": "/opt/evil.so"})
    reply = await answer(bot, "/rebuild", "staging 1")
    assert "`LD_PRELOAD` may not be set from Slack" in reply["text"]
    assert mutations(bk) == []


async def test_a_protected_rebuild_checks_the_originals_branch_and_commit(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_build("staging", state="failed", branch="main..x")
    bk.add_build("staging", state="failed", commit="not-a-sha")
    branch = await answer(bot, "/rebuild", "staging 1")
    assert "Cannot rebuild it as a new build" in branch["text"]
    assert "is not a valid branch name" in branch["text"]
    commit = await answer(bot, "/rebuild", "staging 2")
    assert "#2's commit is not a commit SHA" in commit["text"]
    assert mutations(bk) == []
