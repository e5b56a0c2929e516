"""A person's App Home, end to end: signed app_home_opened events and Home clicks in, the views
published to Slack, the Buildkite calls and the Redis state out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators import slack_requests
from app.simulators.bot import FAST, SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.tuning import InboxTuning

CHANNEL, ALICE, BOB, CAROL = "C0CHAN", "U0USER", "U0BOB", "U0CAROL"
BUILD = "/organizations/acme/pipelines/{}/builds/{}"
POLICY = """\
default:
  deployers: [U0USER, U0BOB]
pipelines:
  prod:
    protected: true
    deployers: [U0USER]
    approval:
      approvers: [U0BOB]
      expires_after: 10m
"""


def tuned(debounce: float) -> Any:
    return dataclasses.replace(FAST, inbox=InboxTuning(home_debounce=debounce))


@pytest.fixture
def people(slack: FakeSlack, bk: FakeBuildkite) -> None:
    slack.add_user(BOB, "bob", "bob@example.com", tz="America/New_York")
    slack.add_user(CAROL, "carol", "carol@example.com")
    for slug in ("web", "prod"):
        bk.add_pipeline(slug)
    bk.add_pipeline("gated", block="Release")
    bk.add_pipeline(
        "forms", block="Approve", block_fields=[{"text": "Notes", "key": "notes", "required": True}]
    )


async def start(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path, *, debounce: float
) -> Any:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    return running_bot(slack, bk, redis_url, policy_file=str(policy), tuning=tuned(debounce))


@pytest.fixture
async def bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
    people: None,
) -> AsyncIterator[BotClient]:
    async with await start(slack, bk, redis_url, tmp_path, debounce=0.05) as client:
        yield client


async def settled(bot: BotClient) -> None:
    await bot.settled()
    assert bot.services.inbox is not None
    await bot.services.inbox.settled()
    await bot.settled()


async def open_home(bot: BotClient, user: str, *, event_id: str | None = None) -> dict[str, Any]:
    event = {"type": "app_home_opened", "user": user, "channel": "D0" + user[2:], "tab": "home"}
    body, headers = slack_requests.event_callback(
        event, signing_secret=SIGNING_SECRET, event_id=event_id
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await settled(bot)
    return bot.slack.home_views[user]


def publishes(slack: FakeSlack, user: str) -> list[Any]:
    return [c for c in slack.calls_to("views.publish") if c.ok and c.args["user_id"] == user]


def home_text(view: dict[str, Any]) -> str:
    return json.dumps(view["blocks"])


def actions_of(view: dict[str, Any]) -> list[str]:
    found = []
    for block in view["blocks"]:
        elements = list(block.get("elements") or [])
        if isinstance(block.get("accessory"), dict):
            elements.append(block["accessory"])
        found += [str(e.get("action_id")) for e in elements if e.get("type") == "button"]
    return found


async def deploy(bot: BotClient, pipeline: str, user: str) -> None:
    before = len(bot.slack.posts(CHANNEL))
    await bot.command("/deploy", pipeline, user_id=user)
    await bot.slack.wait_for(lambda: len(bot.slack.posts(CHANNEL)) > before)
    await settled(bot)


async def move(bot: BotClient, slug: str, number: int, state: str, **kwargs: Any) -> None:
    bot.bk.set_build_state(slug, number, state, **kwargs)
    assert (await bot.webhook(bot.bk.webhook_payload(slug, number))).status == 200
    await settled(bot)


async def click(bot: BotClient, user: str, action_id: str, **kwargs: Any) -> None:
    view = bot.slack.home_views[user]
    payload = slack_requests.home_action_payload(view, action_id, user_id=user, **kwargs)
    body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    await settled(bot)


async def test_each_person_sees_their_own_builds_approvals_and_locks(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    await open_home(bot, CAROL)  # Carol's email is now known: Buildkite credits her below
    await deploy(bot, "web", ALICE)  # web #1
    await deploy(bot, "web", BOB)  # web #2
    bk.add_build("web", state="running", author={"name": "Carol", "email": "CAROL@example.com"})
    await bot.services.tracker.track(
        bk_build(bk, "web", 3), pipeline="web", channel=CHANNEL, requester=None
    )
    await settled(bot)
    await bot.command("/deploy", "lock web release day", user_id=ALICE)
    await _request_approval(bot)
    await settled(bot)

    alice, bob = await open_home(bot, ALICE), await open_home(bot, BOB)
    alice_text, bob_text = home_text(alice), home_text(bob)
    assert "web #1" in alice_text and "web #2" not in alice_text and "web #3" not in alice_text
    assert "web #2" in bob_text and "web #1" not in bob_text
    assert "home_cancel" in actions_of(alice) and "home_cancel" in actions_of(bob)
    # The approval request waits for Bob (the approver), not for Alice (who asked).
    assert "home_approve" in actions_of(bob) and "home_reject" in actions_of(bob)
    assert "home_approve" not in actions_of(alice)
    assert "asks for a deploy of `prod`" in bob_text
    # Alice's lock, with its Unlock button, in her Home only.
    assert "home_unlock" in actions_of(alice) and "release day" in alice_text
    assert "home_unlock" not in actions_of(bob)
    # Notifications: the default (failures only), and Bob's timezone from users.info.
    assert "America/New_York" in bob_text
    assert '"value": "failures"' in json.dumps(bob["blocks"])
    # Carol's Home got web #3 (credited to her email) when it changed, without a lookup.
    assert "web #3" in home_text(slack.home_views[CAROL])
    assert slack.calls_to("users.lookupByEmail") == []
    assert await redis_client.ttl("{bkchatops}:home:opened:U0BOB") > 6 * 24 * 3600


def bk_build(bk: FakeBuildkite, slug: str, number: int) -> Any:
    from buildkite.models import Build

    return Build.model_validate(bk.build(slug, number))


async def _request_approval(bot: BotClient) -> None:
    _, name, _ = await bot.command("/deploy", "prod main")
    reply = (await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name]))[
        -1
    ].json
    confirm = next(
        e["value"]
        for b in reply["blocks"]
        for e in b.get("elements", [])
        if e.get("action_id") == "deploy_confirm"
    )
    await bot.click("deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True)
    await bot.slack.wait_for(
        lambda: [c for c in bot.slack.posts(CHANNEL) if "asks to deploy" in c.args["text"]]
    )


async def test_a_state_change_republishes_the_home_of_those_who_opened_it(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await deploy(bot, "web", ALICE)
    await deploy(bot, "web", BOB)
    await open_home(bot, ALICE)  # Bob never opens his
    before = len(publishes(slack, ALICE))
    await move(bot, "web", 1, "passed")
    await slack.wait_for(lambda: "Passed" in home_text(slack.home_views[ALICE]))
    assert len(publishes(slack, ALICE)) > before
    await move(bot, "web", 2, "failed")
    assert publishes(slack, BOB) == []


async def test_a_burst_of_changes_publishes_once_per_window(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
    people: None,
) -> None:
    async with await start(slack, bk, redis_url, tmp_path, debounce=600) as bot:
        await deploy(bot, "web", ALICE)
        await open_home(bot, ALICE)  # published, and a window of 600 s opened
        assert len(publishes(slack, ALICE)) == 1
        await redis_client.delete("{bkchatops}:home:window:U0USER")  # as if it had passed
        for state in ("running", "failing", "failed"):
            kwargs = {"failed_jobs": ["Test"]} if state != "running" else {}
            bot.bk.set_build_state("web", 1, state, **kwargs)
            assert (await bot.webhook(bot.bk.webhook_payload("web", 1))).status == 200
            await bot.settled()
        # The first change is shown at once; the others wait for the window's end.
        assert len(publishes(slack, ALICE)) == 2
        assert await redis_client.exists("{bkchatops}:home:dirty:U0USER")
        assert 0 < await redis_client.pttl("{bkchatops}:home:window:U0USER") <= 600_000


async def test_home_buttons_act_as_the_build_messages_do(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    await deploy(bot, "web", ALICE)
    await move(bot, "web", 1, "running")
    await open_home(bot, ALICE)
    await click(bot, ALICE, "home_cancel")
    assert len(bk.requests_to("PUT", BUILD.format("web", 1) + "/cancel")) == 1
    (notice,) = slack.calls_to("views.open")
    assert "Cancel requested" in json.dumps(notice.args["view"])
    assert "Canceled" in home_text(slack.home_views[ALICE])
    assert "home_cancel" not in actions_of(slack.home_views[ALICE])


async def test_a_refused_home_click_is_answered_in_a_modal_and_does_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    await deploy(bot, "web", ALICE)
    await move(bot, "web", 1, "running")
    await open_home(bot, ALICE)
    await bot.command("/deploy", "lock web", user_id=BOB)  # Bob's lock stops Alice's rebuild
    await move(bot, "web", 1, "passed")
    await click(bot, ALICE, "home_rebuild")
    assert bk.requests_to("PUT") == []
    (notice,) = slack.calls_to("views.open")
    assert "locked" in json.dumps(notice.args["view"]).lower()


async def test_home_approve_starts_the_deploy_and_reject_is_for_approvers_only(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await _request_approval(bot)
    await open_home(bot, BOB)
    await click(bot, BOB, "home_approve")
    assert len(bk.requests_to("POST", "/organizations/acme/pipelines/prod/builds")) == 1
    assert "Approved" in json.dumps(slack.calls_to("views.open")[-1].args["view"])
    assert "home_approve" not in actions_of(slack.home_views[BOB])


async def test_home_unlock_and_the_dm_preferences(
    bot: BotClient, slack: FakeSlack, redis_client: Any
) -> None:
    await bot.command("/deploy", "lock web", user_id=ALICE)
    await settled(bot)
    await open_home(bot, ALICE)
    await click(bot, ALICE, "home_unlock")
    assert await redis_client.get("{bkchatops}:pipelock:web") is None
    assert "home_unlock" not in actions_of(slack.home_views[ALICE])

    await click(bot, ALICE, "home_dm_mode", selected="all")
    await click(bot, ALICE, "home_quiet_from", selected="22")
    await click(bot, ALICE, "home_quiet_to", selected="7")
    saved = json.loads(await redis_client.get("{bkchatops}:prefs:U0USER"))
    assert saved == {"mode": "all", "quiet_from": 22, "quiet_to": 7}
    assert "from 22:00 to 07:00" in home_text(slack.home_views[ALICE])
    await click(bot, ALICE, "home_quiet_to", selected="none")
    saved = json.loads(await redis_client.get("{bkchatops}:prefs:U0USER"))
    assert saved["quiet_from"] is None and saved["quiet_to"] is None


async def test_a_home_opened_on_the_messages_tab_publishes_nothing(
    bot: BotClient, slack: FakeSlack
) -> None:
    event = {"type": "app_home_opened", "user": ALICE, "channel": "D0USER", "tab": "messages"}
    body, headers = slack_requests.event_callback(event, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    await settled(bot)
    assert slack.calls_to("views.publish") == []


async def test_home_unblock_unblocks_or_opens_the_steps_form(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await deploy(bot, "gated", ALICE)
    await move(bot, "gated", 1, "passed", blocked=True)
    await open_home(bot, ALICE)
    await click(bot, ALICE, "home_unblock")
    (put,) = bk.requests_to("PUT", BUILD.format("gated", 1) + "/jobs/")
    assert put.path.endswith("/unblock")
    assert any("unblocked *Release*" in str(p.args["text"]) for p in slack.posts(CHANNEL))

    await deploy(bot, "forms", ALICE)
    await move(bot, "forms", 1, "passed", blocked=True)
    await click(
        bot,
        ALICE,
        "home_unblock",
        value=json.dumps({"pipeline": "forms", "number": 1}, separators=(",", ":")),
    )
    form = slack.calls_to("views.open")[-1].args["view"]
    assert form["callback_id"] == "unblock_submit"
    metadata = json.loads(form["private_metadata"])
    assert metadata["channel"] == CHANNEL and metadata["pipeline"] == "forms"
    assert len(bk.requests_to("PUT")) == 1  # nothing unblocked before the form is sent


async def test_a_forged_home_button_is_answered_and_does_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await deploy(bot, "web", ALICE)
    await move(bot, "web", 1, "running")
    view = await open_home(bot, ALICE)
    payload = slack_requests.home_action_payload(view, "home_cancel", user_id=ALICE)
    payload["actions"][0]["value"] = json.dumps({"pipeline": "../secret", "number": 1})
    body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    await settled(bot)
    assert bk.requests_to("PUT") == []
    (notice,) = slack.calls_to("views.open")
    assert "not valid any more" in json.dumps(notice.args["view"])


async def test_a_rate_limited_publish_waits_out_retry_after(
    bot: BotClient, slack: FakeSlack
) -> None:
    slack.fail_next("views.publish", "ratelimited", retry_after=1)
    await open_home(bot, ALICE)
    calls = slack.calls_to("views.publish")
    assert [c.status for c in calls] == [429, 200]  # sent again, once Retry-After passed
    assert slack.home_views[ALICE]["type"] == "home"


async def forged_click(bot: BotClient, view: dict[str, Any], action_id: str, user: str) -> None:
    """`user` sends a click on a button of someone else's Home (a value they never saw)."""
    payload = slack_requests.home_action_payload(view, action_id, user_id=user)
    body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    await settled(bot)


async def test_an_approve_forged_by_someone_who_may_not_decide_it_does_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await _request_approval(bot)
    bobs = await open_home(bot, BOB)
    await open_home(bot, CAROL)
    assert "home_approve" not in actions_of(slack.home_views[CAROL])
    await forged_click(bot, bobs, "home_approve", CAROL)
    await forged_click(bot, bobs, "home_approve", ALICE)  # the requester may not approve either
    assert bk.requests_to("POST", "/organizations/acme/pipelines/prod/builds") == []
    assert len(slack.calls_to("views.open")) == 2  # each told why


async def test_a_home_click_on_a_build_outside_the_persons_home_does_nothing(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    # Bob may cancel web builds from their messages, in channels he is in; his Home is his
    # own builds only, and a value naming someone else's build is not one it showed him.
    await deploy(bot, "web", ALICE)
    await move(bot, "web", 1, "running")
    alices = await open_home(bot, ALICE)
    await open_home(bot, BOB)
    await forged_click(bot, alices, "home_cancel", BOB)
    assert bk.requests_to("PUT") == []
    (notice,) = slack.calls_to("views.open")
    assert "not in your Home" in json.dumps(notice.args["view"])


@pytest.mark.parametrize("forged", ["²", "٣", "007", "24", "-1", " 7", "", "none7"])
async def test_a_forged_quiet_hour_is_answered_and_saves_nothing(
    bot: BotClient, slack: FakeSlack, redis_client: Any, forged: str
) -> None:
    view = await open_home(bot, ALICE)
    payload = slack_requests.home_action_payload(view, "home_quiet_from", selected="22")
    payload["actions"][0]["selected_option"]["value"] = forged
    body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
    assert (await bot.post_slack(body, headers)).status == 200
    await settled(bot)
    assert await redis_client.get("{bkchatops}:prefs:U0USER") is None
    (notice,) = slack.calls_to("views.open")
    assert "view" in notice.args
