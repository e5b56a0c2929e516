"""Pasted build links unfurl as live build cards, and "Follow this build" follows one in a
message's thread: end to end, through signed events and shortcuts, asserting on what reached
Slack and Buildkite."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

CHANNEL, ALICE, BOB = "C0CHAN", "U0USER", "U0BOB"
URL = "https://buildkite.com/acme/{}/builds/{}"
BUILDS = "/organizations/acme/pipelines/"
POLICY = """\
default:
  deployers: [U0USER, U0BOB]
pipelines:
  locked-down:
    deployers: [U0USER]
"""


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    for slug in ("web", "locked-down"):
        bk.add_pipeline(slug)
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as client:
        yield client


async def send_event(
    bot: BotClient, event: dict[str, Any], *, event_id: str | None = None, retry: int | None = None
) -> None:
    body, headers = slack_requests.event_callback(
        event, signing_secret=SIGNING_SECRET, event_id=event_id, retry_num=retry
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await bot.settled()


def buildkite_reads(bk: FakeBuildkite) -> list[str]:
    return [r.path for r in bk.requests_to("GET", BUILDS)]


def card_of(slack: FakeSlack, url: str) -> dict[str, Any]:
    (call,) = [c for c in slack.calls_to("chat.unfurl") if c.ok]
    unfurl = call.args["unfurls"][url]
    assert isinstance(unfurl, dict)
    return unfurl


def buttons(card: dict[str, Any]) -> list[str]:
    return [
        str(e.get("action_id"))
        for b in card["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
    ]


async def test_a_pasted_build_link_unfurls_as_a_card_for_one_buildkite_request(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="failed", branch="main", message="Fix <the> *thing*")
    url = URL.format("web", 1)
    others = [
        "https://buildkite.com/other-org/web/builds/1",  # another organisation: never read
        "https://buildkite.com/acme/web",  # a pipeline, not a build
    ]
    event = slack.share_links(CHANNEL, ALICE, [url, *others])
    await send_event(bot, event)
    assert buildkite_reads(bk) == ["/v2" + BUILDS + "web/builds/1"]
    (call,) = slack.calls_to("chat.unfurl")
    assert call.ok
    assert call.args["unfurl_id"] == event["unfurl_id"]
    assert call.args["source"] == "conversations_history"
    assert set(call.args["unfurls"]) == {url}
    card = card_of(slack, url)
    text = json.dumps(card["blocks"])
    assert "Failed" in text and "`main`" in text and "*By*" in text
    assert "Fix &lt;the&gt; *thing*" in text  # the build's message as text, never markup
    assert buttons(card) == ["build_rebuild", "build_retry_failed", "build_open"]


async def test_the_bots_own_builds_unfurl_without_any_buildkite_request(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await bot.command("/deploy", "web")
    await slack.wait_for(lambda: slack.posts(CHANNEL))
    await bot.settled()
    reads = len(buildkite_reads(bk))
    await send_event(bot, slack.share_links("C0OTHER", BOB, [URL.format("web", 1)]))
    assert len(buildkite_reads(bk)) == reads
    card = card_of(slack, URL.format("web", 1))
    assert buttons(card) == ["build_cancel", "build_open"]


async def test_the_cards_buttons_are_the_ones_the_policy_allows_the_sharer(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("locked-down", state="running")
    await send_event(bot, slack.share_links(CHANNEL, BOB, [URL.format("locked-down", 1)]))
    assert buttons(card_of(slack, URL.format("locked-down", 1))) == ["build_open"]


async def test_a_retried_link_shared_event_unfurls_once(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="passed")
    event = slack.share_links(CHANNEL, ALICE, [URL.format("web", 1)])
    await send_event(bot, event, event_id="Ev0LINK1")
    await send_event(bot, event, event_id="Ev0LINK1", retry=1)
    assert len(slack.calls_to("chat.unfurl")) == 1
    assert len(buildkite_reads(bk)) == 1


async def test_a_link_to_a_build_that_does_not_exist_is_left_alone(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    await send_event(bot, slack.share_links(CHANNEL, ALICE, [URL.format("web", 999)]))
    assert slack.calls_to("chat.unfurl") == []
    assert len(buildkite_reads(bk)) == 1


async def test_a_link_in_the_composer_unfurls_by_its_unfurl_id(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="running")
    event = slack.share_links(CHANNEL, ALICE, [URL.format("web", 1)], source="composer")
    await send_event(bot, event)
    (call,) = slack.calls_to("chat.unfurl")
    assert call.ok and call.args["source"] == "composer" and "ts" not in call.args


async def test_the_fake_refuses_an_unfurl_slack_would_refuse(slack: FakeSlack) -> None:
    """chat.unfurl names the message by channel+ts or by unfurl_id+source, never half of each,
    and only links shared there."""
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    event = slack.share_links(CHANNEL, ALICE, [URL.format("web", 1)])
    card = {URL.format("web", 1): {"blocks": [{"type": "divider"}]}}
    bad = [
        {"channel": CHANNEL, "unfurls": card},
        {"unfurl_id": event["unfurl_id"], "unfurls": card},
        {"channel": CHANNEL, "ts": event["message_ts"], "unfurls": {"https://x.test/": card}},
        {"unfurl_id": event["unfurl_id"], "source": "conversations_history"},
    ]
    for args in bad:
        with pytest.raises(SlackApiError):
            await client.api_call("chat.unfurl", json=args)
    good = await client.api_call(
        "chat.unfurl", json={"channel": CHANNEL, "ts": event["message_ts"], "unfurls": card}
    )
    assert good["ok"] is True
    assert len(slack.unexpected) == len(bad)
    slack.unexpected.clear()


# -- the "Follow this build" shortcut ----------------------------------------------------------


async def shortcut(bot: BotClient, message: dict[str, Any], user: str = ALICE) -> str:
    name, url = bot.new_response_url()
    body, headers = slack_requests.message_shortcut(
        "follow_build", message, response_url=url, signing_secret=SIGNING_SECRET, user_id=user
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await bot.settled()
    return name


async def test_follow_this_build_follows_it_in_the_messages_thread(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="running")
    ts = slack.add_message(CHANNEL, f"is this one ok? {URL.format('web', 1)}", user=BOB)
    name = await shortcut(bot, slack.message(CHANNEL, ts))
    assert "Following" in bot.response_texts(name)[0]
    in_thread = [p for p in slack.posts(CHANNEL) if p.args.get("thread_ts") == ts]
    (root,) = [p for p in in_thread if str(p.args["text"]).startswith("web #1:")]
    # The build is followed there: its next state edits that message, and commands work.
    bk.set_build_state("web", 1, "passed")
    await bot.webhook(bk.webhook_payload("web", 1))
    await bot.settled()
    assert "Passed" in json.dumps(slack.message(CHANNEL, str(root.response["ts"]))["blocks"])
    mention_ts = slack.add_message(CHANNEL, "<@U0BOT> status", thread_ts=ts, user=ALICE)
    await send_event(
        bot,
        {
            "type": "app_mention",
            "user": ALICE,
            "text": "<@U0BOT> status",
            "ts": mention_ts,
            "thread_ts": ts,
            "channel": CHANNEL,
        },
    )
    assert any(
        "*State*" in json.dumps(p.args.get("blocks"))
        for p in slack.posts(CHANNEL)
        if p.args.get("thread_ts") == ts
        and p.args.get("metadata", {})
        .get("event_payload", {})
        .get("key", "")
        .startswith("mention:")
    )
    # Following it again in the same channel says so, and posts nothing.
    posts = len(slack.posts(CHANNEL))
    again = await shortcut(bot, slack.message(CHANNEL, ts), user=BOB)
    assert "already follow" in bot.response_texts(again)[0]
    assert len(slack.posts(CHANNEL)) == posts


async def test_follow_on_a_message_without_a_build_link_says_what_it_needs(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = slack.add_message(CHANNEL, "https://buildkite.com/someone-else/web/builds/1", user=BOB)
    name = await shortcut(bot, slack.message(CHANNEL, ts))
    assert "links no build" in bot.response_texts(name)[0]
    assert slack.posts(CHANNEL) == [] and bk.requests_to("GET", BUILDS) == []


async def test_follow_in_a_channel_the_bot_is_not_in_tells_the_person(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    slack.add_channel("C0PRIV", "secret", is_private=True, is_member=False)
    bk.add_build("web", state="running")
    ts = slack.add_message("C0PRIV", f"see {URL.format('web', 1)}", user=BOB)
    name, url = bot.new_response_url()
    body, headers = slack_requests.message_shortcut(
        "follow_build",
        slack.message("C0PRIV", ts),
        response_url=url,
        signing_secret=SIGNING_SECRET,
        channel_id="C0PRIV",
        channel_name="secret",
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await bot.settled()
    texts = await slack.wait_for(lambda: bot.response_texts(name)[1:])
    assert "invite" in texts[0].lower()
    assert slack.posts("C0PRIV") == []


async def test_a_followed_builds_card_is_unfurled_again_as_it_moves_on(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any
) -> None:
    await bot.command("/deploy", "web")
    await slack.wait_for(lambda: slack.posts(CHANNEL))
    await bot.settled()
    url = URL.format("web", 1)
    event = slack.share_links("C0OTHER", BOB, [url])
    await send_event(bot, event)
    for state in ("running", "passed"):
        bk.set_build_state("web", 1, state)
        await bot.webhook(bk.webhook_payload("web", 1))
        await bot.settled()
    unfurls = [c for c in slack.calls_to("chat.unfurl") if c.ok]
    shown = [json.dumps(c.args["unfurls"][url]["blocks"]) for c in unfurls]
    assert len(shown) == 3 and "Running" in shown[1] and "Passed" in shown[2]
    assert all(c.args["unfurl_id"] == event["unfurl_id"] for c in unfurls)
    assert buttons(unfurls[2].args["unfurls"][url])[:1] == ["build_rebuild"]
    # Final: nothing is kept to unfurl again.
    assert [k async for k in redis_client.scan_iter(match="{bkchatops}:unfurls:*")] == []


async def test_a_message_of_many_build_links_costs_at_most_three_buildkite_requests(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    # Links to builds that do not exist find no card: they must still count against the bound,
    # or a message of 20 such links would cost 20 requests.
    bk.add_build("web", state="passed")
    urls = [URL.format("web", n) for n in range(500, 520)]
    await send_event(bot, slack.share_links(CHANNEL, ALICE, urls))
    assert len(buildkite_reads(bk)) == 3
    assert [c for c in slack.calls_to("chat.unfurl") if c.ok] == []


async def test_two_links_to_one_build_cost_one_request_and_both_unfurl(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="passed")
    urls = [URL.format("web", 1), URL.format("web", 1) + "#job-1", URL.format("web", 1) + "/"]
    await send_event(bot, slack.share_links(CHANNEL, ALICE, urls))
    assert len(buildkite_reads(bk)) == 1
    (call,) = [c for c in slack.calls_to("chat.unfurl") if c.ok]
    assert set(call.args["unfurls"]) == set(urls)


@pytest.mark.parametrize(
    "url",
    [
        "http://buildkite.com/acme/web/builds/1",  # not https
        "https://buildkite.com.evil.com/acme/web/builds/1",
        "https://evil.buildkite.com/acme/web/builds/1",
        "https://user@buildkite.com/acme/web/builds/1",  # userinfo
        "https://buildkite.com:8443/acme/web/builds/1",
        "https://buildkite.com/other-org/x/builds/9?next=https://buildkite.com/acme/web/builds/1",
        "https://buildkite.com/acme/w%65b/builds/1",  # percent-encoded
        "https://buildkite.com/acme/web/builds/1abc",  # trailing junk
        "https://buildkite.com/acme/web/builds/1/../../other/builds/1",
        "https://buildkite.com/acme/web/builds/99999999999999999999",  # huge
        "https://buildkite.com/acme/web/builds/0",
    ],
)
async def test_links_that_only_look_like_a_build_of_the_org_are_left_alone(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, url: str
) -> None:
    bk.add_build("web", state="passed")
    await send_event(bot, slack.share_links(CHANNEL, ALICE, [url]))
    assert buildkite_reads(bk) == []
    assert slack.calls_to("chat.unfurl") == []
