"""App Home's "Active freezes": a signed app_home_opened event in, the view published at the
fake Slack out, on the bot's own clock: the freezes in force with their reason (as text) and
end (a Slack date token), and each freeze's next occurrence."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.freeze_announcements import FreezeAnnouncer
from app.simulators import slack_requests
from app.simulators.bot import FAST, SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.tuning import InboxTuning
from tests.clocks import Clock

ALICE = "U0USER"


def at(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


#: Saturday 28 March 2026, noon UTC: in the weekend freeze, before the holiday one.
DURING = at(2026, 3, 28, 12, 0)
#: The weekend freeze's end, Monday 08:00 CEST (06:00 UTC, after the DST change).
WEEKEND_END = int(at(2026, 3, 30, 6, 0))
HOLIDAY_START, HOLIDAY_END = int(at(2026, 4, 3, 0, 0)), int(at(2026, 4, 7, 0, 0))

POLICY = """\
default:
  deployers: [U0USER]
freezes:
  - pipelines: ["deploy-*", "payments"]
    weekly: "fri 16:00 - mon 08:00"
    timezone: Europe/Berlin
    reason: "weekend <!channel> *freeze*"
  - pipelines: ["*"]
    from: 2026-04-03T00:00
    to: 2026-04-07T00:00
    timezone: UTC
    reason: easter freeze
"""


@pytest.fixture
def clock() -> Clock:
    return Clock(DURING)


@pytest.fixture
async def bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
    clock: Clock,
) -> AsyncIterator[BotClient]:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy), tuning=tuning) as b:
        yield b


async def open_home(bot: BotClient, user: str, event_id: str) -> dict[str, Any]:
    event = {"type": "app_home_opened", "user": user, "channel": "D0" + user[2:], "tab": "home"}
    body, headers = slack_requests.event_callback(
        event, signing_secret=SIGNING_SECRET, event_id=event_id
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await bot.settled()
    assert bot.services.inbox is not None
    await bot.services.inbox.settled()
    publishes = [
        c for c in bot.slack.calls_to("views.publish") if c.ok and c.args["user_id"] == user
    ]
    assert publishes, "no views.publish for the person"
    view = publishes[-1].args["view"]
    return dict(json.loads(view) if isinstance(view, str) else view)


def freezes_section(view: dict[str, Any]) -> list[dict[str, Any]]:
    """The blocks between the "Active freezes" header and the next divider."""
    blocks = view["blocks"]
    start = next(
        i
        for i, b in enumerate(blocks)
        if b["type"] == "header" and b["text"]["text"] == "Active freezes"
    )
    end = next(i for i in range(start + 1, len(blocks)) if blocks[i]["type"] == "divider")
    return list(blocks[start + 1 : end])


def texts(blocks: list[dict[str, Any]]) -> list[str]:
    found = []
    for block in blocks:
        if block["type"] == "section":
            found.append(block["text"]["text"])
        for element in block.get("elements", []):
            found.append(element.get("text", ""))
    return found


async def test_the_home_lists_the_freezes_in_force_and_the_next_ones(
    bot: BotClient, clock: Clock
) -> None:
    view = await open_home(bot, ALICE, "Ev1")
    headers = [b["text"]["text"] for b in view["blocks"] if b["type"] == "header"]
    assert headers == [
        "My builds",
        "Waiting for me",
        "My locks",
        "Active freezes",
        "My notifications",
    ]
    section, coming = freezes_section(view)
    assert section["type"] == "section" and coming["type"] == "context"
    now_text, coming_text = texts([section])[0], texts([coming])[0]
    assert now_text.startswith(":snowflake: Deploys of these pipelines are refused now:")
    # The reason is text: it mentions nobody.
    assert "&lt;!channel&gt;" in now_text and "<!channel>" not in json.dumps(view)
    assert "`deploy-*`, `payments`" in now_text
    assert (
        f"until <!date^{WEEKEND_END}^{{date_short_pretty}} {{time}}|Mon 30 Mar 2026 08:00 CEST>"
        in now_text
    )
    assert "easter" not in now_text
    assert coming_text.startswith("Coming:")
    assert "`easter freeze`: `*`" in coming_text
    assert f"from <!date^{HOLIDAY_START}^" in coming_text
    assert f"to <!date^{HOLIDAY_END}^" in coming_text
    # The weekend freeze's next occurrence, the Friday after.
    assert f"<!date^{int(at(2026, 4, 3, 14, 0))}^" in coming_text

    # After both: nothing in force, and the next weekend still coming.
    clock.now = at(2026, 4, 8, 12, 0)
    later = freezes_section(await open_home(bot, ALICE, "Ev2"))
    assert texts(later)[0] == "No freeze is in force."
    assert "weekend" in texts(later)[1] and "easter" not in texts(later)[1]


async def test_a_freeze_start_and_end_republish_the_homes_opened_lately_once(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    """The freeze announcer's sweep, at a start and at an end, republishes the Homes of those
    who opened theirs in the last 7 days, once across two replicas; not the others'. (Its Redis
    is flushed by `redis_client`: an earlier test's event ids would be taken as Slack retries.)"""
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    # Friday 27 March, 14:00 UTC: an hour before the weekend freeze (16:00 CET).
    clock = Clock(at(2026, 3, 27, 14, 0))
    sweeps = dataclasses.replace(FAST.sweeps, freeze_interval=3600, lock_interval=3600)
    tuning = dataclasses.replace(
        FAST, clock=clock, sweeps=sweeps, inbox=InboxTuning(home_debounce=0.05)
    )
    bob = "U0BOB"
    slack.add_user(bob, "bob", "bob@example.com")
    path = str(policy)

    def homes(user: str) -> list[dict[str, Any]]:
        return [
            json.loads(c.args["view"]) if isinstance(c.args["view"], str) else c.args["view"]
            for c in slack.calls_to("views.publish")
            if c.ok and c.args["user_id"] == user
        ]

    async def opened(bot: BotClient, user: str, event_id: str) -> dict[str, Any]:
        """The person opens their Home: the view published for them (waited for, not assumed
        done once the bot settled: a loaded machine may take a while)."""
        before = len(homes(user))
        event = {"type": "app_home_opened", "user": user, "channel": "D0" + user[2:], "tab": "home"}
        body, headers = slack_requests.event_callback(
            event, signing_secret=SIGNING_SECRET, event_id=event_id
        )
        assert (await bot.post_slack(body, headers)).status == 200
        await slack.wait_for(lambda: len(homes(user)) > before, timeout=30)
        return homes(user)[-1]

    async with (
        running_bot(slack, bk, redis_url, policy_file=path, tuning=tuning) as one,
        running_bot(slack, bk, redis_url, policy_file=path, tuning=tuning) as two,
    ):
        now = clock.now
        clock.now = now - 8 * 24 * 3600  # Bob last opened his Home eight days ago
        await opened(one, bob, "Ev0")
        clock.now = now
        before = freezes_section(await opened(one, ALICE, "Ev1"))
        assert texts(before)[0] == "No freeze is in force."

        announcers = []
        for b in (one, two):
            s, inbox = b.services, b.services.inbox
            assert inbox is not None
            announcers.append(
                FreezeAnnouncer(
                    s.policy, s.store, s.outbox, sweeps, clock, homes_changed=inbox.everyone_changed
                )
            )

        async def sweep_both() -> None:
            await asyncio.gather(*(a.sweep() for a in announcers))
            for b in (one, two):
                assert b.services.inbox is not None
                await b.services.inbox.settled()
                await b.settled(timeout=30)

        published, bobs = len(homes(ALICE)), len(homes(bob))
        clock.now = at(2026, 3, 27, 15, 0)
        await sweep_both()
        await sweep_both()
        await slack.wait_for(lambda: len(homes(ALICE)) > published, timeout=30)
        await sweep_both()  # and once more: a second publish would have arrived by now
        assert len(homes(ALICE)) == published + 1
        frozen = texts(freezes_section(homes(ALICE)[-1]))[0]
        assert frozen.startswith(":snowflake: Deploys of these pipelines are refused now:")

        clock.now = WEEKEND_END + 60
        await sweep_both()
        await slack.wait_for(lambda: len(homes(ALICE)) > published + 1, timeout=30)
        await sweep_both()
        assert len(homes(ALICE)) == published + 2
        assert texts(freezes_section(homes(ALICE)[-1]))[0] == "No freeze is in force."
        assert len(homes(bob)) == bobs
