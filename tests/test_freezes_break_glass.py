"""Break-glass as it takes effect: an approval goes through the freeze occurrence the request
was asked in and no other (another freeze, or a later occurrence of the same one, refuses it
and tells the requester); with no freeze left it goes on under the pipeline's usual policy.
Rollback and promotion break the glass as /deploy does; each refusal names the action refused;
and a freeze's reason from the policy file is literal text wherever it is shown."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.freeze_announcements import FreezeAnnouncer
from app.core.ledger_rebuild import rebuild_ledger
from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack.render import releases as release_texts
from app.slack.render import texts
from tests.clocks import Clock
from tests.test_freezes import (
    ADMIN,
    ALICE,
    BERLIN,
    BOB,
    BUILDS,
    CHANNEL,
    LAST_MINUTE,
    answer,
    approve_value,
    at,
    audit_entries,
)
from tests.test_home_freezes import freezes_section, open_home

SHA1, SHA2 = "1" * 40, "2" * 40

#: The weekend freeze, and a release freeze on the Monday morning right after it (so that at
#: the weekend's last minute deploys wait for the release freeze's end).
POLICY = f"""\
admins: [{ADMIN}]
pipelines:
  deploy-prod:
    deployers: [{ALICE}, {BOB}]
  deploy-edge:
    promote_from: deploy-staging
  deploy-gated:
    approval:
      approvers: [{BOB}]
freezes:
  - pipelines: ["deploy-*"]
    weekly: "fri 16:00 - mon 08:00"
    timezone: {BERLIN}
    reason: weekend freeze
    channels: [{CHANNEL}]
  - pipelines: ["deploy-*"]
    from: 2026-03-30T08:00
    to: 2026-03-30T12:00
    timezone: {BERLIN}
    reason: release freeze
    channels: [{CHANNEL}]
"""

#: Monday 30 March, 09:00 CEST: the weekend freeze is over, the release freeze in force.
IN_RELEASE_FREEZE = at(2026, 3, 30, 7, 0)
#: Monday 30 March, 12:00 CEST: both are over.
AFTER_BOTH = at(2026, 3, 30, 10, 0)
#: Friday 3 April, 17:00 CEST: the next weekend's freeze.
NEXT_WEEKEND = at(2026, 4, 3, 15, 0)


@pytest.fixture
def clock() -> Clock:
    return Clock(LAST_MINUTE)


@pytest.fixture
async def bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    clock: Clock,
    tmp_path: Path,
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_user(ADMIN, "admin", "admin@example.com")
    for slug in ("deploy-prod", "deploy-gated", "deploy-staging", "deploy-edge"):
        bk.add_pipeline(slug, default_branch="main")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(policy)) as b:
        yield b


async def break_glass(bot: BotClient, text: str) -> str:
    """Ask to break the glass; returns the ts of the approval request in the channel."""
    before = len([p for p in bot.slack.posts(CHANNEL) if "Approval needed" in p.args["text"]])
    reply = await answer(bot, "/deploy", text)
    assert "Approval requested in the channel" in reply["text"], reply
    requests = await bot.slack.wait_for(
        lambda: (
            found
            if len(
                found := [
                    p for p in bot.slack.posts(CHANNEL) if "Approval needed" in p.args["text"]
                ]
            )
            > before
            else []
        )
    )
    return str(requests[-1].response["ts"])


async def approve(bot: BotClient, ts: str, user: str, value: str | None = None) -> str:
    """Click Approve on the request (with `value`, a button its message no longer shows)."""
    _, name = await bot.click(
        "approval_approve",
        value or approve_value(bot.slack, ts),
        channel=CHANNEL,
        message_ts=ts,
        user_id=user,
    )
    return (await bot.slack.wait_for(lambda: bot.response_texts(name)))[0]


# -- the approval re-checks the freeze --------------------------------------------------------


@pytest.mark.parametrize(
    ("approved_at", "now_frozen_by"),
    [(IN_RELEASE_FREEZE, "release freeze"), (NEXT_WEEKEND, "weekend freeze")],
    ids=["another freeze", "a later occurrence of the same freeze"],
)
async def test_a_break_glass_approved_in_another_freeze_is_refused_and_the_requester_told(
    bot: BotClient,
    bk: FakeBuildkite,
    slack: FakeSlack,
    clock: Clock,
    redis_client: Any,
    approved_at: float,
    now_frozen_by: str,
) -> None:
    ts = await break_glass(bot, "deploy-prod --break-glass db is down")
    value = approve_value(slack, ts)
    clock.now = approved_at
    said = await approve(bot, ts, ADMIN)
    assert said.startswith(":no_entry: Approved, but not started:")
    assert "the break-glass was asked during the freeze `weekend freeze (weekly" in said
    assert f"is now frozen by `{now_frozen_by}`" in said
    assert "ask again with `--break-glass`" in said
    assert bk.requests_to("POST") == []
    # The request ends: its message says so, and the requester is told in its thread.
    assert "but not started" in slack.message(CHANNEL, ts)["text"]
    told = await slack.wait_for(
        lambda: [p for p in slack.posts(CHANNEL) if p.args.get("thread_ts") == ts]
    )
    assert (
        told[0]
        .args["text"]
        .startswith(f":no_entry: <@{ALICE}>, your break-glass request on `deploy-prod` ended:")
    )
    entries = await audit_entries(redis_client)
    (refused,) = [e for e in entries if e["user"] == ADMIN]
    assert (refused["action"], refused["outcome"]) == ("approve", "refused")
    assert refused["detail"].startswith(f"break-glass: another freeze ({now_frozen_by} (")
    # Decided: a second click changes nothing.
    assert "already" in await approve(bot, ts, ADMIN, value)
    assert bk.requests_to("POST") == []


async def test_a_break_glass_approved_in_the_same_freeze_starts(
    bot: BotClient, bk: FakeBuildkite, clock: Clock
) -> None:
    """The weekend freeze's last minute: deploys wait for the release freeze that follows, but
    the freeze in force, the one the request names, is still the weekend's."""
    ts = await break_glass(bot, "deploy-prod --break-glass db is down")
    clock.now = LAST_MINUTE + 30
    assert "Approved. Started" in await approve(bot, ts, ADMIN)
    assert len(bk.requests_to("POST", BUILDS.format("deploy-prod"))) == 1


async def test_with_no_freeze_left_the_approval_counts_under_the_usual_policy(
    bot: BotClient, bk: FakeBuildkite, clock: Clock, redis_client: Any
) -> None:
    """deploy-gated's rule wants Bob's approval: the break-glass asked him, and once the freezes
    are over his approval is the one that rule wants; the admin's is not."""
    ts = await break_glass(bot, "deploy-gated --break-glass db is down")
    clock.now = AFTER_BOTH
    assert "may approve" in await approve(bot, ts, ADMIN)
    assert bk.requests_to("POST") == []
    assert "Approved. Started" in await approve(bot, ts, BOB)
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-gated"))
    assert create.json["meta_data"]["chatops_approved_by"] == BOB
    entries = await audit_entries(redis_client)
    (approved,) = [e for e in entries if e["outcome"] == "approved"]
    assert approved["user"] == BOB
    assert approved["detail"].endswith(
        "; no freeze in force when approved: under the pipeline's usual policy"
    )


async def test_with_no_freeze_left_a_pipeline_that_needs_no_approval_deploys(
    bot: BotClient, bk: FakeBuildkite, clock: Clock
) -> None:
    ts = await break_glass(bot, "deploy-prod --break-glass db is down")
    clock.now = AFTER_BOTH
    assert "Approved. Started" in await approve(bot, ts, ADMIN)
    assert len(bk.requests_to("POST", BUILDS.format("deploy-prod"))) == 1


# -- rollback and promotion break the glass too -------------------------------------------------


async def seed_ledger(bot: BotClient, bk: FakeBuildkite) -> None:
    """Two passed deployments of deploy-prod and one of deploy-staging, as Buildkite has them."""
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    for sha in (SHA1, SHA2):
        bk.add_build("deploy-prod", commit=sha, branch="main", state="passed", meta_data=meta)
    bk.add_build("deploy-staging", commit=SHA2, branch="main", state="passed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)


async def test_rollback_and_promote_are_refused_by_name_and_may_break_the_glass(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    await seed_ledger(bot, bk)
    refused = (await answer(bot, "/deploy", "rollback deploy-prod"))["text"]
    assert "`deploy-prod` is frozen: `weekend freeze`" in refused
    assert "The rollback was not started." in refused
    assert "`/deploy rollback deploy-prod [to #N] --break-glass <reason>`" in refused
    refused = (await answer(bot, "/deploy", "promote deploy-edge"))["text"]
    assert "The promotion was not started." in refused
    assert "`/deploy promote deploy-edge --break-glass <reason>`" in refused
    assert bk.requests_to("POST") == []

    ts = await break_glass(bot, "rollback deploy-prod to #1 --break-glass bad release")
    announced = [p.args["text"] for p in slack.posts(CHANNEL) if "Break-glass" in p.args["text"]]
    assert f"<@{ALICE}> asks to roll back `deploy-prod` from #2" in announced[-1]
    assert "Reason: bad release" in announced[-1]
    assert "*Rollback of:* #2" in json.dumps(slack.message(CHANNEL, ts)["blocks"])
    assert "Approved. Started" in await approve(bot, ts, ADMIN)
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
    assert create.json["commit"] == SHA1
    assert create.json["meta_data"]["chatops_rollback_of"] == "2"
    assert create.json["meta_data"]["chatops_break_glass"] == "bad release"
    assert create.json["meta_data"]["chatops_approved_by"] == ADMIN
    await bot.settled()

    ts = await break_glass(bot, "promote deploy-edge --break-glass staging fix must go out")
    announced = [p.args["text"] for p in slack.posts(CHANNEL) if "Break-glass" in p.args["text"]]
    assert "asks to promote `222222222222` from `deploy-staging#1`" in announced[-1]
    assert "Approved. Started" in await approve(bot, ts, ADMIN)
    (promoted,) = bk.requests_to("POST", BUILDS.format("deploy-edge"))
    assert promoted.json["commit"] == SHA2
    assert promoted.json["meta_data"]["chatops_break_glass"] == "staging fix must go out"
    outcomes = [(e["action"], e["outcome"]) for e in await audit_entries(redis_client)]
    assert ("rollback", "refused") in outcomes and ("promote", "refused") in outcomes
    assert outcomes.count(("deploy", "break-glass requested")) == 2


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("rollback deploy-prod --break-glass", "Say why after `--break-glass`"),
        ("promote deploy-edge extra --break-glass why", "Usage: `/deploy promote <pipeline>"),
        ("rollback deploy-prod to #x --break-glass why", "`#x` is not a build number"),
        ("rollback deploy-prod --break-glass db down, to #3", "Put `to #N` before `--break-glass`"),
    ],
)
async def test_a_bad_break_glass_rollback_or_promote_gets_its_usage(
    bot: BotClient, bk: FakeBuildkite, text: str, said: str
) -> None:
    _, _, ack = await bot.command("/deploy", text)
    assert said in ack["text"]
    assert bk.requests_to("POST") == []


async def test_a_break_glass_rollback_outside_a_freeze_is_refused(
    bot: BotClient, bk: FakeBuildkite, clock: Clock
) -> None:
    await seed_ledger(bot, bk)
    clock.now = AFTER_BOTH
    reply = (await answer(bot, "/deploy", "rollback deploy-prod --break-glass why not"))["text"]
    assert "`deploy-prod` is not frozen now: `--break-glass` is only for a freeze" in reply
    assert bk.requests_to("POST") == []


# -- a freeze's reason is text -----------------------------------------------------------------

HOSTILE = "*bold* _it_ ~st~ `code` <!channel> & <https://evil.example|click>"
#: How every surface shows it: a code span, escaped, its backticks unable to end it.
SHOWN = "`*bold* _it_ ~st~ 'code' &lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;`"


async def test_a_freeze_reason_is_literal_text_everywhere_it_is_shown(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(
        f"""\
admins: [{ADMIN}]
freezes:
  - pipelines: ["deploy-*"]
    weekly: "fri 16:00 - mon 08:00"
    timezone: {BERLIN}
    reason: {json.dumps(HOSTILE)}
    channels: [{CHANNEL}]
"""
    )
    slack.add_user(ADMIN, "admin", "admin@example.com")
    bk.add_pipeline("deploy-prod", default_branch="main")
    clock = Clock(LAST_MINUTE)
    sweeps = dataclasses.replace(FAST.sweeps, freeze_interval=3600, lock_interval=3600)
    tuning = dataclasses.replace(FAST, clock=clock, sweeps=sweeps)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(policy)) as bot:
        shown = {
            "refusal": (await answer(bot, "/deploy", "deploy-prod"))["text"],
            "freezes": (await answer(bot, "/deploy", "freezes"))["text"],
            "status": json.dumps((await answer(bot, "/deploy", "status deploy-prod"))["blocks"]),
        }
        await break_glass(bot, "deploy-prod --break-glass db is down")
        shown["break-glass"] = "\n".join(p.args["text"] for p in slack.posts(CHANNEL))
        home = json.dumps(freezes_section(await open_home(bot, ALICE, "Ev1")))
        shown["home"] = json.loads(home)[0]["text"]["text"]
        announcer = FreezeAnnouncer(
            bot.services.policy, bot.services.store, bot.services.outbox, tuning.sweeps, clock
        )
        clock.now = at(2026, 3, 30, 6, 1)
        await announcer.sweep()
        await bot.settled()
        shown["announcement"] = slack.posts(CHANNEL)[-1].args["text"]
        assert "has ended" in shown["announcement"]
        everything = json.dumps([c.args for c in slack.calls]) + json.dumps(
            [r.json for r in slack.responses]
        )
    status = json.loads(shown["status"])
    shown["status"] = "\n".join(str((b.get("text") or {}).get("text", "")) for b in status)
    for where, text in shown.items():
        assert SHOWN in text, where
    assert "<!channel>" not in everything and "<https://evil.example" not in everything


def test_a_policy_rule_name_is_text_in_every_refusal_naming_it() -> None:
    """A rule's name is its key in the policy file: quoted as code, never markup."""
    rule = "web-`*`<!channel>&"
    quoted = "`web-'*'&lt;!channel&gt;&amp;`"
    for text in (
        release_texts.no_promote_rule("web", rule),
        release_texts.not_promoted("web", "staging", rule, "HEAD", "a" * 40, "https://x"),
        texts.no_agent_approvers("web", rule),
        texts.no_longer_allowed(ALICE, "deploy", "web", CHANNEL, rule),
    ):
        assert quoted in text and "<!channel>" not in text


OVERLAPPING = f"""\
admins: [{ADMIN}]
pipelines:
  deploy-prod:
    deployers: [{ALICE}]
freezes:
  - pipelines: ["deploy-*"]
    weekly: "fri 16:00 - mon 08:00"
    timezone: {BERLIN}
    reason: weekend freeze
  - pipelines: ["deploy-prod"]
    from: 2026-03-28T10:00
    to: 2026-03-28T12:00
    timezone: {BERLIN}
    reason: incident freeze
"""


async def test_a_freeze_that_starts_on_top_of_the_one_asked_in_refuses_the_approval(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    """Asked in the weekend freeze; an incident freeze (ending sooner) starts on top of it before
    the approval: refused, though the weekend freeze is still the one that ends last. Asked
    while both are in force, it is approved through both."""
    slack.add_user(ADMIN, "admin", "admin@example.com")
    bk.add_pipeline("deploy-prod", default_branch="main")
    policy = tmp_path / "policy.yml"
    policy.write_text(OVERLAPPING)
    clock = Clock(at(2026, 3, 28, 8, 0))  # Saturday 09:00 CET: the weekend freeze alone
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(policy)) as bot:
        ts = await break_glass(bot, "deploy-prod --break-glass db is down")
        clock.now = at(2026, 3, 28, 10, 0)  # 11:00: the incident freeze too
        said = await approve(bot, ts, ADMIN)
        assert said.startswith(":no_entry: Approved, but not started:"), said
        assert "is now frozen by `incident freeze`" in said
        assert bk.requests_to("POST") == []

        ts = await break_glass(bot, "deploy-prod --break-glass still down")  # asked in both
        clock.now = at(2026, 3, 28, 10, 30)
        said = await approve(bot, ts, ADMIN)
        assert "not started" not in said, said
        await slack.wait_for(lambda: bk.requests_to("POST"), timeout=30)
        assert len(bk.requests_to("POST")) == 1
