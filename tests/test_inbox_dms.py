"""DMs about a person's own finished builds, end to end: their preferences, quiet hours in their
Slack timezone (on an injected clock) with one summary after, and exactly once."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage.inbox import DmMode, DmPrefs
from app.tuning import InboxTuning
from buildkite.models import Build

CHANNEL, ALICE, BOB = "C0CHAN", "U0USER", "U0BOB"
NEW_YORK = ZoneInfo("America/New_York")


class Clock:
    """The wall clock the bot reads quiet hours on, set by the test."""

    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, at: datetime) -> None:
        self.now = at.timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 10, 12, 0, tzinfo=NEW_YORK))


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, clock: Clock
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com", tz="America/New_York")
    bk.add_pipeline("web", steps=("Test",))
    tuning = dataclasses.replace(
        FAST, clock=clock, inbox=InboxTuning(home_debounce=0.05, dm_sweep_interval=0.05)
    )
    async with running_bot(slack, bk, redis_url, tuning=tuning) as client:
        yield client


def dms(slack: FakeSlack, user: str) -> list[str]:
    channel = "D" + user.removeprefix("U")
    return [str(c.args["text"]) for c in slack.posts(channel)]


async def deploy_and_finish(bot: BotClient, user: str, state: str) -> int:
    before = len(bot.slack.posts(CHANNEL))
    await bot.command("/deploy", "web", user_id=user)
    await bot.slack.wait_for(lambda: len(bot.slack.posts(CHANNEL)) > before)
    await bot.settled()
    number = max(b["number"] for b in bot.bk.builds_of("web"))
    failed = ["Test"] if state == "failed" else []
    bot.bk.set_build_state("web", number, state, failed_jobs=failed)
    assert (await bot.webhook(bot.bk.webhook_payload("web", number))).status == 200
    await bot.settled()
    return int(number)


async def set_prefs(redis_client: Any, user: str, prefs: DmPrefs) -> None:
    await redis_client.set(f"{{bkchatops}}:prefs:{user}", prefs.model_dump_json())


async def test_failures_only_by_default(bot: BotClient, slack: FakeSlack) -> None:
    await deploy_and_finish(bot, ALICE, "passed")
    assert dms(slack, ALICE) == []
    await deploy_and_finish(bot, ALICE, "failed")
    (text,) = dms(slack, ALICE)
    assert "web #2" in text and "failed" in text and "`main`" in text
    (call,) = slack.posts("D0USER")
    assert call.args["metadata"]["event_payload"]["key"].startswith("dm:")
    assert [c.args["users"] for c in slack.calls_to("conversations.open")] == [ALICE]


async def test_all_finals_and_off(bot: BotClient, slack: FakeSlack, redis_client: Any) -> None:
    await set_prefs(redis_client, ALICE, DmPrefs(mode=DmMode.ALL))
    await deploy_and_finish(bot, ALICE, "passed")
    assert len(dms(slack, ALICE)) == 1 and "passed" in dms(slack, ALICE)[0]
    await set_prefs(redis_client, ALICE, DmPrefs(mode=DmMode.OFF))
    await deploy_and_finish(bot, ALICE, "failed")
    assert len(dms(slack, ALICE)) == 1


async def test_the_author_hears_of_a_build_not_deployed_through_the_bot(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    bk.add_build("web", state="running", author={"name": "Bob", "email": "bob@example.com"})
    build = Build.model_validate(bk.build("web", 1))
    await bot.services.tracker.track(build, pipeline="web", channel=CHANNEL, requester=None)
    await bot.settled()
    bk.set_build_state("web", 1, "failed", failed_jobs=["Test"])
    await bot.webhook(bk.webhook_payload("web", 1))
    await bot.settled()
    assert len(dms(slack, BOB)) == 1 and dms(slack, ALICE) == []
    # Deployed through the bot by Alice, credited to Bob in Buildkite: Alice only.
    await deploy_and_finish(bot, ALICE, "failed")
    assert len(dms(slack, ALICE)) == 1 and len(dms(slack, BOB)) == 1


async def test_quiet_hours_hold_dms_and_send_one_summary_after(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, redis_client: Any, clock: Clock
) -> None:
    await set_prefs(redis_client, BOB, DmPrefs(mode=DmMode.ALL, quiet_from=22, quiet_to=7))
    clock.set(datetime(2026, 3, 10, 23, 30, tzinfo=NEW_YORK))  # 23:30 for Bob
    for state in ("failed", "passed"):
        await deploy_and_finish(bot, BOB, state)
    assert dms(slack, BOB) == []
    held = await redis_client.hgetall("{bkchatops}:dm:held:U0BOB")
    assert len(held) == 2
    (due,) = await redis_client.zrange("{bkchatops}:dm:due", 0, -1, withscores=True)
    assert due[1] == datetime(2026, 3, 11, 7, 0, tzinfo=NEW_YORK).timestamp()
    # Still quiet at 06:59; at 07:01 the summary goes, once.
    clock.set(datetime(2026, 3, 11, 6, 59, tzinfo=NEW_YORK))
    assert bot.services.dms is not None
    assert await bot.services.dms.send_due_summaries() == 0
    clock.set(datetime(2026, 3, 11, 7, 1, tzinfo=NEW_YORK))
    (summary,) = await slack.wait_for(lambda: dms(slack, BOB))
    assert "quiet hours" in summary and "web #1" in summary and "web #2" in summary
    assert await bot.services.dms.send_due_summaries() == 0
    assert len(dms(slack, BOB)) == 1
    assert await redis_client.exists("{bkchatops}:dm:held:U0BOB") == 0
    # Outside quiet hours a DM goes at once.
    await deploy_and_finish(bot, BOB, "failed")
    assert len(dms(slack, BOB)) == 2


async def test_a_dm_is_sent_once_when_its_change_is_told_again(
    bot: BotClient, slack: FakeSlack, redis_client: Any
) -> None:
    number = await deploy_and_finish(bot, ALICE, "failed")
    assert len(dms(slack, ALICE)) == 1
    tracked = await bot.services.store.find("web", number)
    assert tracked is not None
    build = Build.model_validate(tracked.snapshot)
    assert bot.services.dms is not None
    # Told again (another replica, or the notifier after a restart): nothing is sent.
    await bot.services.dms.on_change(tracked, build)
    assert len(dms(slack, ALICE)) == 1
    # A process killed after Slack took the DM but before it noted so: the next one finds the
    # DM in the conversation (its key is in its metadata) and sends nothing.
    key = f"dm:{tracked.build_id}:{tracked.gen}:{ALICE}"
    await redis_client.delete(f"{{bkchatops}}:dm:done:{key}")
    await redis_client.set(f"{{bkchatops}}:post:{key}", repr(clock_of(slack)))
    await bot.services.dms.on_change(tracked, build)
    assert len(dms(slack, ALICE)) == 1
    assert slack.calls_to("conversations.history")[-1].args["channel"] == "D0USER"
    assert await redis_client.exists(f"{{bkchatops}}:dm:done:{key}")


def clock_of(slack: FakeSlack) -> float:
    """When the DM was posted, as the process that died would have noted it."""
    (call,) = slack.posts("D0USER")
    return float(json.loads(json.dumps(call.response["ts"])))


GONE = "U0GONE"  # a person Slack will never let the bot DM (deactivated: user_not_found)


async def test_a_summary_slack_refuses_for_good_is_dropped_and_the_others_still_go(
    bot: BotClient, slack: FakeSlack, redis_client: Any, clock: Clock
) -> None:
    assert bot.services.dms is not None
    store = bot.services.store
    now = clock()
    await store.hold_dm(GONE, "dm:a", "web #1 failed", until=now + 50, now=now)
    await store.hold_dm(BOB, "dm:b", "web #2 failed", until=now + 60, now=now)
    clock.now = now + 120
    await bot.services.dms.send_due_summaries()  # or the bot's own sweep, meanwhile
    (summary,) = await slack.wait_for(lambda: dms(slack, BOB))
    assert "web #2" in summary
    # Not tried again on every sweep: the held lines and the due entry are gone.
    assert await redis_client.exists("{bkchatops}:dm:held:U0GONE") == 0
    assert await redis_client.zrange("{bkchatops}:dm:due", 0, -1) == []
    assert await bot.services.dms.send_due_summaries() == 0


async def test_a_dm_failing_for_now_is_retried_even_when_another_fails_for_good(
    bot: BotClient, slack: FakeSlack, redis_client: Any
) -> None:
    from app.slack.outbox import SlackDeliveryError

    await set_prefs(redis_client, ALICE, DmPrefs(mode=DmMode.OFF))
    number = await deploy_and_finish(bot, ALICE, "failed")
    await set_prefs(redis_client, ALICE, DmPrefs(mode=DmMode.FAILURES))
    tracked = await bot.services.store.find("web", number)
    assert tracked is not None and bot.services.dms is not None
    gone = tracked.targets[0].model_copy(update={"requester": GONE, "channel": "C0OTHER"})
    both = tracked.model_copy(update={"targets": [gone, *tracked.targets]})
    slack.fail_next("chat.postMessage", "internal_error", status=200, n=3)  # Alice's, for now
    with pytest.raises(SlackDeliveryError) as raised:
        await bot.services.dms.on_change(both, Build.model_validate(tracked.snapshot))
    # The notifier retries a transition only for a failure that is not permanent.
    assert not raised.value.permanent
    assert dms(slack, ALICE) == []
    with pytest.raises(SlackDeliveryError) as raised:  # told again: Alice's goes this time
        await bot.services.dms.on_change(both, Build.model_validate(tracked.snapshot))
    assert raised.value.permanent  # only the DM Slack refuses for good is left: given up on
    assert len(dms(slack, ALICE)) == 1


@pytest.mark.parametrize(
    ("missing", "method", "args"),
    [
        ("im:history", "conversations.history", {"channel": "D0USER"}),
        ("channels:history", "conversations.history", {"channel": CHANNEL}),
        ("channels:history", "conversations.replies", {"channel": CHANNEL, "ts": "1.1"}),
        ("users:read", "users.info", {"user": BOB}),
        ("users:read.email", "users.lookupByEmail", {"email": "bob@example.com"}),
    ],
)
async def test_the_fake_refuses_what_slack_refuses_without_the_scope(
    bot: BotClient, slack: FakeSlack, missing: str, method: str, args: dict[str, str]
) -> None:
    # The DM look-up after a crash reads the DM's history: that is what im:history is for.
    from slack_sdk.errors import SlackApiError

    await bot.services.outbox.open_dm(ALICE)
    slack.add_message(CHANNEL, "hello", user=ALICE)
    slack.scopes = slack.scopes - {missing}
    with pytest.raises(SlackApiError) as refused:
        await bot.services.outbox.client.api_call(method, http_verb="GET", params=args)
    assert refused.value.response["error"] == "missing_scope"


async def test_the_fake_leaves_the_email_out_without_users_read_email(
    bot: BotClient, slack: FakeSlack
) -> None:
    slack.scopes = slack.scopes - {"users:read.email"}
    info = await bot.services.outbox.client.users_info(user=BOB)
    assert info["user"]["id"] == BOB and "email" not in info["user"]["profile"]


async def test_a_long_summary_shows_whole_lines_and_counts_the_rest(
    bot: BotClient, slack: FakeSlack, clock: Clock
) -> None:
    assert bot.services.dms is not None
    now = clock()
    link = "<https://buildkite.com/acme/web/builds/{n}|web #{n}>"
    for n in range(1, 31):
        line = f":x: {link.format(n=n)} failed (`{'b' * 100}`)"
        await bot.services.store.hold_dm(BOB, f"dm:{n}", line, until=now + 60, now=now + n)
    clock.now = now + 120  # due now, all of them held (the bot's own sweep runs meanwhile)
    await bot.services.dms.send_due_summaries()  # or the bot's own sweep, meanwhile
    (summary,) = await slack.wait_for(lambda: dms(slack, BOB))
    body = summary.split("\n")
    shown = [line for line in body[1:] if line.startswith("• ")]
    assert 10 < len(shown) < 30
    for line in shown:  # every link whole: as many opened as closed
        assert line.count("<") == line.count(">") == 1 and line.endswith("`)")
    assert body[-1] == f"…and {30 - len(shown)} more."


async def test_a_dm_held_while_its_summary_is_sent_is_not_lost(
    bot: BotClient, slack: FakeSlack, redis_client: Any, clock: Clock
) -> None:
    assert bot.services.dms is not None
    store = bot.services.store
    now = clock()
    await store.hold_dm(BOB, "dm:1", "web #1 failed", until=now + 60, now=now)
    held = await store.held_dms(BOB)
    # Another replica holds one more between this sweep's read and its clearing.
    await store.hold_dm(BOB, "dm:2", "web #2 failed", until=now + 60, now=now + 1)
    assert await store.clear_held_dms(BOB, [field for field, _ in held]) == 1
    clock.now = now + 120
    await bot.services.dms.send_due_summaries()
    (summary,) = await slack.wait_for(lambda: dms(slack, BOB))
    assert "web #2" in summary and "web #1" not in summary
    assert await redis_client.exists("{bkchatops}:dm:held:U0BOB") == 0
    assert await redis_client.zrange("{bkchatops}:dm:due", 0, -1) == []


@pytest.mark.parametrize("tz", ["America", "Etc", "a" * 300, "../../etc/passwd", "Mars/Base"])
async def test_a_timezone_slack_gives_that_is_no_zone_counts_as_utc(
    bot: BotClient, slack: FakeSlack, redis_client: Any, tz: str
) -> None:
    slack.users[ALICE]["tz"] = tz
    # 12:00 in New York is 17:00 UTC: outside 22:00-07:00, so the DM goes at once.
    await set_prefs(redis_client, ALICE, DmPrefs(quiet_from=22, quiet_to=7))
    await deploy_and_finish(bot, ALICE, "failed")
    assert len(dms(slack, ALICE)) == 1
