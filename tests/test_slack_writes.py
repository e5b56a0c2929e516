"""How the bot's Slack writes reach Slack: over reused connections, and never editing one
message more often than Slack allows (while still showing the latest state)."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from app.main import create_slack_client
from app.simulators.bot import bot_settings, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack.outbox import Outbox
from app.slack.render.common import Rendered

CHANNEL = "C0CHAN"
INTERVAL = 0.3


def rendered(text: str) -> Rendered:
    return Rendered(
        text=text, blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    )


async def posted(outbox: Outbox) -> str:
    return await outbox.post(CHANNEL, rendered("scheduled"))


async def test_an_edit_right_after_the_last_one_was_sent_still_waits_the_interval(
    slack: FakeSlack,
) -> None:
    outbox = Outbox(AsyncWebClient(token=slack.bot_token, base_url=slack.api_url))
    outbox.edit_interval = INTERVAL
    ts = await posted(outbox)

    await outbox.update(CHANNEL, ts, rendered("running"))  # sent at once: nothing before it
    await outbox.update(CHANNEL, ts, rendered("failing"))  # the first is sent and done

    first, second = slack.updates(CHANNEL)
    # Arrival times at the fake: waiting less could only make this gap smaller, never larger.
    assert second.time - first.time >= INTERVAL
    assert slack.message(CHANNEL, ts)["text"] == "failing"


async def test_edits_waiting_for_the_interval_collapse_into_the_latest(slack: FakeSlack) -> None:
    outbox = Outbox(AsyncWebClient(token=slack.bot_token, base_url=slack.api_url))
    outbox.edit_interval = INTERVAL
    ts = await posted(outbox)
    await outbox.update(CHANNEL, ts, rendered("running"))

    await asyncio.gather(
        *(outbox.update(CHANNEL, ts, rendered(s)) for s in ("failing", "canceling", "failed"))
    )

    assert [c.args["text"] for c in slack.updates(CHANNEL)] == ["running", "failed"]
    first, second = slack.updates(CHANNEL)
    assert second.time - first.time >= INTERVAL
    assert slack.message(CHANNEL, ts)["text"] == "failed"


async def test_edit_times_are_kept_for_one_interval_only(slack: FakeSlack) -> None:
    now = [1000.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    outbox = Outbox(
        AsyncWebClient(token=slack.bot_token, base_url=slack.api_url),
        clock=lambda: now[0],
        sleep=sleep,
    )
    messages = [await posted(outbox) for _ in range(5)]
    for ts in messages:
        await outbox.update(CHANNEL, ts, rendered("running"))
    assert waits == [1.0, 1.0, 1.0, 1.0]  # the posts' pacing; no edit waited yet

    now[0] += 0.5
    await outbox.update(CHANNEL, messages[0], rendered("failing"))
    assert waits[4:] == [0.5]  # edited half an interval ago: waits the other half

    now[0] += outbox.edit_interval
    await outbox.update(CHANNEL, messages[1], rendered("failing"))
    assert waits[5:] == []  # its last edit is older than the interval: sent at once
    # Memory stays bounded by the edits of the last interval: the older times are gone.
    assert len(outbox._edited) == 1


async def test_the_bot_reuses_its_connections_to_slack(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("web")
    async with running_bot(slack, bk, redis_url) as bot:
        resp, _, _ = await bot.command("/deploy", "web", channel_id=CHANNEL)
        assert resp.status == 200
        ts = (await slack.wait_for(lambda: slack.posts(CHANNEL)))[0].response["ts"]
        for state, shown in (("running", "Running"), ("passed", "Passed")):
            bk.set_build_state("web", 1, state)
            assert (await bot.webhook(bk.webhook_payload("web", 1))).status == 200
            await slack.wait_for(
                partial(lambda s: s in str(slack.message(CHANNEL, ts)), shown), timeout=10
            )
        await slack.wait_for(lambda: "passed" in str(slack.thread(CHANNEL, ts)), timeout=10)
        session = bot.services.outbox.client.session
    # The start-up checks, the message, its two edits and two thread replies at least.
    assert len(slack.calls) >= 7
    # One connection per call is what slack_sdk does without a shared session.
    assert len({c.peer for c in slack.calls}) < len(slack.calls) / 2
    assert session is not None and session.closed  # closed at shutdown


async def test_a_keyed_post_whose_answer_is_lost_is_found_not_repeated(
    slack: FakeSlack, bk: FakeBuildkite
) -> None:
    """Any keyed post (build messages, thread replies, approvals, digests): after a dropped
    connection the outbox looks before posting again, even with the SDK's retry handlers on."""
    settings = bot_settings(slack, bk, "redis://unused")
    outbox = Outbox(create_slack_client(settings), post_interval=0.0)
    slack.drop_answer_next("chat.postMessage")
    ts = await outbox.post("C0CHAN", Rendered(text="digest", blocks=[]), key="digest:daily:1")
    assert [m["ts"] for m in slack.history("C0CHAN")] == [ts]
    assert slack.message("C0CHAN", ts)["metadata"]["event_payload"] == {"key": "digest:daily:1"}
    [lookup] = slack.calls_to("conversations.history")
    assert lookup.args["include_all_metadata"] is True
    # Without a key, the SDK's handlers re-send on their own (for writes that may repeat).
    slack.drop_answer_next("chat.postMessage")
    await outbox.post("C0CHAN", Rendered(text="plain", blocks=[]))
    assert [m["text"] for m in slack.history("C0CHAN")].count("plain") == 2
