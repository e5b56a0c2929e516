"""Freeze windows: the windows' arithmetic across daylight-saving changes, the policy's
validation, and end to end the refusals, `/deploy freezes` and the once-only announcements,
with the bot's clock injected (no sleeping, no real time)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.freeze_announcements import FreezeAnnouncer, freeze_channels
from app.core.freezes import (
    Freeze,
    Occurrence,
    active_freeze,
    current_and_upcoming,
    parse_weekly,
)
from app.core.policy import PolicyError, load_policy
from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from tests.clocks import Clock

CHANNEL = "C0CHAN"
ALICE, BOB, ADMIN = "U0USER", "U0BOB", "U0ADMIN"
BUILDS = "/organizations/acme/pipelines/{}/builds"
BERLIN = "Europe/Berlin"


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    """A UTC moment as unix seconds."""
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


def weekend(**extra: Any) -> Freeze:
    return Freeze.model_validate(
        {
            "pipelines": ["deploy-*"],
            "weekly": "fri 16:00 - mon 08:00",
            "timezone": BERLIN,
            "reason": "weekend freeze",
            **extra,
        }
    )


# -- the windows -----------------------------------------------------------------------------


def test_a_weekly_window_is_read_with_days_and_times() -> None:
    window = parse_weekly("Fri 16:00 - Mon 08:00")
    assert (window.start_day, window.start, window.end_day, window.end) == (
        4,
        dt.time(16),
        0,
        dt.time(8),
    )
    assert window.length_days == 3
    assert parse_weekly("monday 09:00 - monday 10:30").length_days == 0
    assert parse_weekly("mon 10:00 - mon 09:00").length_days == 7


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("friday afternoon", "is not a weekly window"),
        ("fri 16:00 - mon", "is not a weekly window"),
        ("fry 16:00 - mon 08:00", "is not a day of the week"),
        ("fri 24:01 - mon 08:00", "is not a time of day"),
        ("fri 25:00 - mon 08:00", "is not a time of day"),
        ("sun 24:00 - mon 00:00", "starts when it ends"),
        ("fri 16:00 - mon \u0660\u0668:\u0660\u0660", "is not a weekly window"),
        ("fri 16:60 - mon 08:00", "is not a time of day"),
        ("fri 16:00 - fri 16:00", "starts when it ends"),
    ],
)
def test_a_bad_weekly_window_is_refused_with_a_sentence(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_weekly(text)


def test_a_weekly_freeze_ends_at_local_time_across_the_spring_change() -> None:
    """Berlin moves from CET (+1) to CEST (+2) on Sunday 29 March 2026: the weekend freeze starts
    at 16:00 CET (15:00 UTC) and ends at 08:00 CEST (06:00 UTC), 63 hours later, not 64."""
    freezes = [weekend()]
    assert active_freeze(freezes, "deploy-prod", at(2026, 3, 27, 14, 59)) is None
    started = active_freeze(freezes, "deploy-prod", at(2026, 3, 27, 15, 0))
    assert started is not None
    assert started.start == dt.datetime(2026, 3, 27, 15, tzinfo=dt.UTC)
    assert started.end == dt.datetime(2026, 3, 30, 6, tzinfo=dt.UTC)
    assert started.end - started.start == dt.timedelta(hours=63)
    # Over the change itself (02:00 CET jumps to 03:00 CEST), and just before the end.
    assert active_freeze(freezes, "deploy-prod", at(2026, 3, 29, 1, 30)) == started
    assert active_freeze(freezes, "deploy-prod", at(2026, 3, 30, 5, 59)) == started
    # 06:30 UTC is 08:30 in Berlin: over, where a fixed +1 offset would still say frozen.
    assert active_freeze(freezes, "deploy-prod", at(2026, 3, 30, 6, 0)) is None
    assert active_freeze(freezes, "deploy-prod", at(2026, 3, 30, 6, 30)) is None
    assert active_freeze(freezes, "web", at(2026, 3, 28, 12, 0)) is None


def test_a_weekly_freeze_ends_at_local_time_across_the_autumn_change() -> None:
    """On 25 October 2026 Berlin goes back to CET: 16:00 CEST is 14:00 UTC, 08:00 CET 07:00 UTC."""
    occurrence = active_freeze([weekend()], "deploy-api", at(2026, 10, 24, 12))
    assert occurrence is not None
    assert occurrence.start == dt.datetime(2026, 10, 23, 14, tzinfo=dt.UTC)
    assert occurrence.end == dt.datetime(2026, 10, 26, 7, tzinfo=dt.UTC)
    assert occurrence.end - occurrence.start == dt.timedelta(hours=65)
    assert active_freeze([weekend()], "deploy-api", at(2026, 10, 26, 6, 59)) is not None
    assert active_freeze([weekend()], "deploy-api", at(2026, 10, 26, 7, 0)) is None


def test_an_absolute_freeze_and_the_one_ending_last_wins() -> None:
    holidays = Freeze.model_validate(
        {
            "pipelines": ["*"],
            "from": "2026-12-22T00:00",
            "to": "2027-01-04T08:00",
            "timezone": "UTC",
            "reason": "holiday freeze",
        }
    )
    assert active_freeze([holidays], "web", at(2026, 12, 21, 23, 59)) is None
    assert active_freeze([holidays], "web", at(2027, 1, 4, 8, 0)) is None
    # Friday 25 December: both freezes; the holidays end later, so they are the one named.
    both = active_freeze([weekend(), holidays], "deploy-prod", at(2026, 12, 25, 18))
    assert both is not None and both.freeze.reason == "holiday freeze"


def test_active_and_upcoming_occurrences() -> None:
    holidays = Freeze.model_validate(
        {
            "pipelines": ["*"],
            "from": dt.date(2026, 12, 22),
            "to": dt.datetime(2027, 1, 4, 8),
            "reason": "holiday freeze",
        }
    )
    active, upcoming = current_and_upcoming([weekend(), holidays], at(2026, 12, 2, 12))
    assert active == []
    assert [o.freeze.reason for o in upcoming] == ["weekend freeze", "holiday freeze"]
    assert upcoming[0].start == dt.datetime(2026, 12, 4, 15, tzinfo=dt.UTC)
    active, upcoming = current_and_upcoming([weekend(), holidays], at(2026, 12, 5, 12))
    assert [o.freeze.reason for o in active] == ["weekend freeze"]
    assert [o.freeze.reason for o in upcoming] == ["weekend freeze", "holiday freeze"]
    assert upcoming[0].start == dt.datetime(2026, 12, 11, 15, tzinfo=dt.UTC)


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ZONES = ("UTC", BERLIN, "America/New_York", "Australia/Sydney", "Asia/Kolkata", "Pacific/Chatham")


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    start=st.tuples(st.integers(0, 6), st.integers(0, 23), st.integers(0, 59)),
    end=st.tuples(st.integers(0, 6), st.integers(0, 23), st.integers(0, 59)),
    moment=st.floats(min_value=at(2026, 1, 1), max_value=at(2028, 1, 1)),
)
def test_any_weekly_window_in_any_zone_keeps_its_local_times(
    zone: str, start: tuple[int, int, int], end: tuple[int, int, int], moment: float
) -> None:
    """Whatever the window, zone and moment: the occurrence in force contains the moment, starts
    and ends at the window's wall-clock times in its zone (a time the clocks skip excepted),
    and the occurrences around it neither overlap nor leave it out."""
    if start == end:
        return
    weekly = (
        f"{DAYS[start[0]]} {start[1]:02}:{start[2]:02} - {DAYS[end[0]]} {end[1]:02}:{end[2]:02}"
    )
    freeze = Freeze.model_validate(
        {"pipelines": ["p"], "weekly": weekly, "timezone": zone, "reason": "r"}
    )
    now = dt.datetime.fromtimestamp(moment, dt.UTC)
    around = list(freeze.occurrences(now - dt.timedelta(days=15), now + dt.timedelta(days=15)))
    assert len(around) >= 4
    for earlier, later in itertools.pairwise(around):
        assert earlier.end <= later.start
        assert later.start - earlier.start <= dt.timedelta(days=7, hours=3)
    containing = [o for o in around if o.active(now)]
    assert active_freeze([freeze], "p", moment) == (containing[0] if containing else None)
    for occurrence in around:
        _check_local(occurrence, start, end)


def _check_local(
    occurrence: Occurrence, start: tuple[int, int, int], end: tuple[int, int, int]
) -> None:
    zone = occurrence.freeze.zone
    for instant, (day, hour, minute) in ((occurrence.start, start), (occurrence.end, end)):
        local = instant.astimezone(zone)
        wall = dt.datetime.combine(local.date(), dt.time(hour, minute))
        skipped = (
            wall.replace(tzinfo=zone).astimezone(dt.UTC).astimezone(zone).time() != wall.time()
        )
        if not skipped:
            assert (local.weekday(), local.hour, local.minute) == (day, hour, minute)


# -- the policy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "line", "problem"),
    [
        ('    weekly: "fri 16:00 - mon 08:00"\n    timezone: Mars/Olympus\n', 5, "IANA time zone"),
        # A directory of the zone database, not a zone: ZoneInfo raises IsADirectoryError.
        ('    weekly: "fri 16:00 - mon 08:00"\n    timezone: America\n', 5, "IANA time zone"),
        ('    weekly: "fri 16h - mon 8h"\n', 4, "is not a weekly window"),
        # A problem of the freeze as a whole is told at its first line.
        ("    from: 2026-12-22T00:00\n    to: 2026-12-21T00:00\n", 2, "ends (to) before"),
        ("    from: 2026-12-22T00:00\n", 2, "needs both from and to"),
        ('    weekly: "fri 16:00 - mon 08:00"\n    from: 2026-12-22\n', 2, "not both"),
        ("    from: next tuesday\n    to: 2026-12-21T00:00\n", 4, "is not a date and time"),
        ("", 2, "needs a window"),
    ],
)
def test_a_bad_freeze_names_the_file_and_line(
    tmp_path: Path, entry: str, line: int, problem: str
) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(f"freezes:\n  - pipelines: [deploy-prod]\n    reason: x\n{entry}")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert f"{path}, line {line}: freezes.0" in str(caught.value)
    assert problem in str(caught.value)


async def test_check_config_names_each_bad_freeze_field(
    slack: FakeSlack, bk: FakeBuildkite, tmp_path: Path
) -> None:
    from app.ops.checks import check_policy, report
    from app.simulators.bot import bot_settings

    path = tmp_path / "policy.yml"
    path.write_text(
        "freezes:\n"
        "  - pipelines: [deploy-prod]\n"
        '    weekly: "fri 16:00 - mon 8am"\n'
        "    timezone: Europe/Berlín\n"
        "    reason: weekend\n"
        "lock_reminder_after: soon\n"
        "pipelines:\n  deploy-prod:\n    superseded: ignore\n"
    )
    check = check_policy(bot_settings(slack, bk, "redis://127.0.0.1:1/0", policy_file=str(path)))
    text, ok = report([check], str)
    assert not ok
    lines = text.splitlines()
    assert len(lines) == 5 and lines[-1] == "1 of 1 checks failed."
    expected = [
        "line 3: freezes.0.weekly: 'fri 16:00 - mon 8am' is not a weekly window",
        "line 4: freezes.0.timezone: 'Europe/Berlín' is not an IANA time zone",
        "line 6: lock_reminder_after: 'soon' is not a duration",
        "line 9: pipelines.deploy-prod.superseded: Input should be 'refuse', 'warn' or 'cancel'",
    ]
    for problem in expected:
        assert any(line.startswith(f"✗ policy: {path}, {problem}") for line in lines), problem


def test_a_freeze_is_announced_in_its_pipelines_channels(tmp_path: Path) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(
        "pipelines:\n"
        "  deploy-prod:\n    channels: [C0PROD]\n"
        "  web:\n    channels: [C0WEB]\n"
        "notifications:\n  - pipelines: ['deploy-*']\n    channel: C0ROUTE\n"
        "freezes:\n  - pipelines: ['deploy-*']\n    weekly: 'fri 16:00 - mon 08:00'\n"
        "    reason: weekend\n"
    )
    policy = load_policy(path)
    assert freeze_channels(policy.data.freezes[0], policy) == ["C0ROUTE", "C0PROD"]
    own = weekend(channels=["C0OWN"])
    assert freeze_channels(own, policy) == ["C0OWN"]


# -- end to end ------------------------------------------------------------------------------


POLICY = f"""\
admins: [{ADMIN}]
pipelines:
  deploy-prod:
    deployers: [{ALICE}, {BOB}]
  web: {{}}
freezes:
  - pipelines: ["deploy-*"]
    weekly: "fri 16:00 - mon 08:00"
    timezone: {BERLIN}
    reason: weekend freeze
    channels: [{CHANNEL}]
"""

#: Monday 30 March 2026, 05:59 UTC (07:59 CEST): the last minute of the weekend freeze.
LAST_MINUTE = at(2026, 3, 30, 5, 59)
#: Its end, 08:00 CEST: 06:00 UTC.
FREEZE_END = at(2026, 3, 30, 6, 0)


@pytest.fixture
def clock() -> Clock:
    return Clock(LAST_MINUTE)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yml"
    path.write_text(POLICY)
    return path


@pytest.fixture
async def bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    clock: Clock,
    policy_file: Path,
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    slack.add_user(ADMIN, "admin", "admin@example.com")
    for slug in ("deploy-prod", "web"):
        bk.add_pipeline(slug, default_branch="main")
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(policy_file)) as b:
        yield b


async def answer(bot: BotClient, command: str, text: str, **kwargs: Any) -> dict[str, Any]:
    _, name, _ = await bot.command(command, text, **kwargs)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return posts[-1].json


async def audit_entries(redis_client: Any) -> list[dict[str, str]]:
    raw = await redis_client.xrange(keys.AUDIT_STREAM)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


async def test_a_deploy_in_a_freeze_is_refused_until_it_ends_in_local_time(
    bot: BotClient, bk: FakeBuildkite, clock: Clock, redis_client: Any
) -> None:
    reply = await answer(bot, "/deploy", "deploy-prod")
    text = reply["text"]
    assert "`deploy-prod` is frozen: `weekend freeze`" in text
    assert "weekly fri 16:00 - mon 08:00, Europe/Berlin" in text
    # When it ends, for each reader in their own zone, and in Berlin's for old clients.
    assert (
        f"<!date^{int(FREEZE_END)}^{{date_short_pretty}} {{time}}|Mon 30 Mar 2026 08:00 CEST>"
        in (text)
    )
    assert "--break-glass" in text
    assert bk.requests_to("POST") == []
    (entry,) = await audit_entries(redis_client)
    assert (entry["action"], entry["outcome"], entry["detail"]) == (
        "deploy",
        "refused",
        "freeze: weekend freeze",
    )
    # A pipeline the freeze does not cover deploys.
    assert "Started" in (await answer(bot, "/deploy", "web"))["text"]

    clock.now = FREEZE_END  # 08:00 in Berlin, though only 07:00 at the freeze's start offset
    reply = await answer(bot, "/deploy", "deploy-prod")
    assert "Started" in reply["text"]
    assert len(bk.requests_to("POST", BUILDS.format("deploy-prod"))) == 1


async def test_rebuild_and_retry_are_refused_but_cancel_and_unblock_go_on(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_build("deploy-prod", state="failed")
    bk.add_build("deploy-prod", state="running")
    rebuild = await answer(bot, "/rebuild", "deploy-prod 1")
    assert "`deploy-prod` is frozen" in rebuild["text"]
    assert "The rebuild was not started" in rebuild["text"]
    retry = '{"pipeline": "deploy-prod", "number": 1}'
    _, name = await bot.click("build_retry_failed", retry, channel=CHANNEL, message_ts="1.000001")
    (retried,) = await bot.slack.wait_for(lambda: bot.response_texts(name))
    # The refusal names the action refused: a retry of the failed jobs, not a rebuild.
    assert "`deploy-prod` is frozen" in retried
    assert "The retry of the failed jobs was not started" in retried
    cancel = await answer(bot, "/cancel", "deploy-prod 2")
    assert "frozen" not in cancel["text"]
    assert len(bk.requests_to("PUT", BUILDS.format("deploy-prod") + "/2/cancel")) == 1
    assert bk.requests_to("POST") == []
    assert [r for r in bk.requests_to("PUT") if r.path.endswith("/retry")] == []


async def test_deploy_freezes_lists_the_active_and_coming_freezes(
    bot: BotClient, clock: Clock
) -> None:
    text = (await answer(bot, "/deploy", "freezes"))["text"]
    assert text.startswith(":snowflake: *Frozen now:*")
    assert "`weekend freeze`" in text and "`deploy-*`" in text
    assert f"until <!date^{int(FREEZE_END)}^" in text
    # The next weekend: Friday 3 April 16:00 CEST is 14:00 UTC.
    assert f"from <!date^{int(at(2026, 4, 3, 14))}^" in text
    clock.now = FREEZE_END
    text = (await answer(bot, "/deploy", "freezes"))["text"]
    assert "No freeze is in force now" in text
    assert "*Coming:*" in text
    _, _, bad = await bot.command("/deploy", "freezes now")
    assert "Usage: `/deploy freezes`" in bad["text"]


async def test_a_freeze_start_and_end_are_announced_once_across_two_bots(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    policy_file: Path,
) -> None:
    """Two replicas sweep at the same moments: each start and end reaches the channel once."""
    clock = Clock(at(2026, 3, 27, 14, 0))  # Friday, an hour before the freeze
    # Sweeps driven by the test alone: the loops look once at start-up, then not for an hour.
    sweeps = dataclasses.replace(FAST.sweeps, freeze_interval=3600, lock_interval=3600)
    tuning = dataclasses.replace(FAST, clock=clock, sweeps=sweeps)
    for slug in ("deploy-prod", "web"):
        bk.add_pipeline(slug, default_branch="main")
    policy = str(policy_file)
    async with (
        running_bot(slack, bk, redis_url, tuning=tuning, policy_file=policy) as one,
        running_bot(slack, bk, redis_url, tuning=tuning, policy_file=policy) as two,
    ):
        announcers = [
            FreezeAnnouncer(
                b.services.policy, b.services.store, b.services.outbox, tuning.sweeps, clock
            )
            for b in (one, two)
        ]

        async def sweep_both() -> list[int]:
            counts = await asyncio.gather(*(a.sweep() for a in announcers))
            await one.settled()
            await two.settled()
            return list(counts)

        assert await sweep_both() == [0, 0]
        clock.now = at(2026, 3, 27, 15, 0)
        assert sorted(await sweep_both()) == [0, 1]
        assert sorted(await sweep_both()) == [0, 0]
        (start,) = slack.posts(CHANNEL)
        assert "A freeze starts: `weekend freeze`" in start.args["text"]
        assert f"until <!date^{int(FREEZE_END)}^" in start.args["text"]

        clock.now = FREEZE_END + 60
        assert sorted(await sweep_both()) == [0, 1]
        clock.now = FREEZE_END + 120
        assert sorted(await sweep_both()) == [0, 0]
        _, end = slack.posts(CHANNEL)
        assert "The freeze `weekend freeze`" in end.args["text"] and "has ended" in end.args["text"]
        # A bot that first looks in the middle of a freeze says it is in force, not starting.
        clock.now = at(2026, 4, 4, 12, 0)
        assert sorted(await sweep_both()) == [0, 1]
        late = slack.posts(CHANNEL)[-1].args["text"]
        assert late.startswith(":snowflake: A freeze is in force since <!date^")
        assert "|Fri 03 Apr 2026 16:00 CEST>" in late
        marks = await redis_client.keys(keys.PREFIX + "freeze:*")
        assert len(marks) == 3
        assert all(ttl > 0 for ttl in [await redis_client.ttl(k) for k in marks])


# -- break-glass -----------------------------------------------------------------------------


async def test_break_glass_asks_an_admin_and_is_audited_with_its_reason(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    reply = await answer(bot, "/deploy", "deploy-prod main --break-glass &lt;!here&gt; db is down")
    assert "Approval requested in the channel" in reply["text"]
    assert bk.requests_to("POST") == []
    announcement, request = await slack.wait_for(
        lambda: (
            [p for p in slack.posts(CHANNEL) if "Break-glass" in p.args["text"]]
            + [p for p in slack.posts(CHANNEL) if "Approval needed" in p.args["text"]]
        )
    )
    said = announcement.args["text"]
    assert said.startswith(":rotating_light: *Break-glass:* <@U0USER> asks to deploy `deploy-prod`")
    assert "during the freeze `weekend freeze`" in said
    # The reason is shown as typed, never as a mention.
    assert "Reason: &lt;!here&gt; db is down" in said and "<!here>" not in said
    assert f"approved by <@{ADMIN}>" in said
    ts = request.response["ts"]
    message = slack.message(CHANNEL, ts)
    assert f"Approval needed from <@{ADMIN}>" in message["text"]
    body = json.dumps(message["blocks"])
    assert "*Break-glass:* &lt;!here&gt; db is down (through the freeze `weekend freeze" in body
    value = next(
        e["value"]
        for b in message["blocks"]
        for e in b.get("elements", [])
        if e.get("action_id") == "approval_approve"
    )

    # Not the requester, and not someone outside the approvers (the admins here).
    _, own = await bot.click("approval_approve", value, channel=CHANNEL, message_ts=ts)
    assert "cannot approve your own" in (await slack.wait_for(lambda: bot.response_texts(own)))[0]
    _, other = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "may approve" in (await slack.wait_for(lambda: bot.response_texts(other)))[0]
    assert bk.requests_to("POST") == []

    _, ok = await bot.click(
        "approval_approve", value, channel=CHANNEL, message_ts=ts, user_id=ADMIN
    )
    assert "Approved. Started" in (await slack.wait_for(lambda: bot.response_texts(ok)))[0]
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
    assert create.json["meta_data"]["chatops_approved_by"] == ADMIN
    assert create.json["meta_data"]["chatops_break_glass"] == "<!here> db is down"
    await bot.settled()

    entries = await audit_entries(redis_client)
    outcomes = [(e["user"], e["action"], e["outcome"], e["detail"]) for e in entries]
    glass = (
        "break-glass: <!here> db is down "
        "(freeze: weekend freeze (weekly fri 16:00 - mon 08:00, Europe/Berlin))"
    )
    assert (ALICE, "deploy", "break-glass requested", glass) in outcomes
    assert (ADMIN, "approve", "approved", glass) in outcomes
    assert (ALICE, "deploy", "started") in [o[:3] for o in outcomes]
    shown = (await answer(bot, "/deploy", "audit deploy-prod", user_id=ADMIN))["text"]
    assert "*break-glass requested* (break-glass: &lt;!here&gt; db is down" in shown


async def test_break_glass_outside_a_freeze_or_without_a_reason_is_refused(
    bot: BotClient, bk: FakeBuildkite, clock: Clock
) -> None:
    _, _, empty = await bot.command("/deploy", "deploy-prod --break-glass")
    assert "Say why after `--break-glass`" in empty["text"]
    clock.now = FREEZE_END
    reply = await answer(bot, "/deploy", "deploy-prod —break-glass just in case")
    assert "`deploy-prod` is not frozen now" in reply["text"]
    assert bk.requests_to("POST") == []


async def test_an_approval_asked_before_a_freeze_is_refused_in_it(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    """An approval takes effect when given: given in a freeze, the deploy is not started."""
    path = tmp_path / "policy.yml"
    path.write_text(
        POLICY.replace(
            "  web: {}\n", f"  web: {{}}\n  deploy-api:\n    approval:\n      approvers: [{BOB}]\n"
        )
    )
    slack.add_user(BOB, "bob", "bob@example.com")
    bk.add_pipeline("deploy-api", default_branch="main")
    clock = Clock(FREEZE_END)
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(path)) as bot:
        confirm = await answer(bot, "/deploy", "deploy-api")
        value = next(
            e["value"]
            for b in confirm["blocks"]
            for e in b.get("elements", [])
            if e.get("action_id") == "deploy_confirm"
        )
        await bot.click("deploy_confirm", value, channel=CHANNEL, message_ts="1.1", ephemeral=True)
        (request,) = await slack.wait_for(
            lambda: [p for p in slack.posts(CHANNEL) if "asks to deploy" in p.args["text"]]
        )
        ts = request.response["ts"]
        approve = next(
            e["value"]
            for b in slack.message(CHANNEL, ts)["blocks"]
            for e in b.get("elements", [])
            if e.get("action_id") == "approval_approve"
        )
        clock.now = at(2026, 4, 3, 14, 30)  # the next Friday, in the freeze
        _, name = await bot.click(
            "approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=BOB
        )
        text = (await slack.wait_for(lambda: bot.response_texts(name)))[0]
        assert "`deploy-api` is frozen: `weekend freeze`" in text
        assert bk.requests_to("POST") == []


async def test_a_build_failing_in_a_freeze_is_not_auto_retried(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(
        POLICY.replace("  web: {}\n", "  web: {}\n  deploy-flaky:\n    auto_retry: {}\n")
    )
    bk.add_pipeline("deploy-flaky", default_branch="main")
    clock = Clock(at(2026, 3, 27, 14, 0))  # an hour before the weekend freeze
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(path)) as bot:
        assert "Started" in (await answer(bot, "/deploy", "deploy-flaky"))["text"]
        (root,) = await slack.wait_for(lambda: slack.posts(CHANNEL))
        clock.now = at(2026, 3, 27, 15, 30)
        bk.set_build_state("deploy-flaky", 1, "failed", failed_jobs=["Test"])
        assert (await bot.webhook(bk.webhook_payload("deploy-flaky", 1))).status == 200
        replies = await slack.wait_for(
            lambda: [
                c.args["text"]
                for c in slack.posts(CHANNEL)
                if c.args.get("thread_ts") == root.response["ts"] and "frozen" in c.args["text"]
            ]
        )
        assert "The automatic retry was not started" in replies[0]
        await bot.settled()
    assert [r for r in bk.requests_to("PUT") if r.path.endswith("/retry_failed_jobs")] == []


async def test_a_confirmation_clicked_once_a_freeze_began_is_refused(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(
        POLICY.replace("  web: {}\n", "  web: {}\n  deploy-api:\n    protected: true\n")
    )
    bk.add_pipeline("deploy-api", default_branch="main")
    clock = Clock(at(2026, 3, 27, 14, 59))  # a minute before the weekend freeze
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(path)) as bot:
        confirm = await answer(bot, "/deploy", "deploy-api")
        value = next(
            e["value"]
            for b in confirm["blocks"]
            for e in b.get("elements", [])
            if e.get("action_id") == "deploy_confirm"
        )
        clock.now = at(2026, 3, 27, 15, 0)
        _, name = await bot.click(
            "deploy_confirm", value, channel=CHANNEL, message_ts="1.1", ephemeral=True
        )
        (text,) = await slack.wait_for(lambda: bot.response_texts(name))
        assert "`deploy-api` is frozen: `weekend freeze`" in text
        assert bk.requests_to("POST") == []


def approve_value(slack: FakeSlack, ts: str) -> str:
    message = slack.message(CHANNEL, ts)
    return str(
        next(
            e["value"]
            for b in message["blocks"]
            for e in b.get("elements", [])
            if e.get("action_id") == "approval_approve"
        )
    )


async def test_a_second_break_glass_while_the_first_waits_is_refused(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    """One emergency, one approval: asking again (or from elsewhere) while the first request
    waits makes no second request; once it is decided, one may ask anew. An approval given
    after someone else took the lock is refused (the re-check)."""
    first = await answer(bot, "/deploy", "deploy-prod --break-glass db is down")
    assert "Approval requested in the channel" in first["text"]
    again = await answer(bot, "/deploy", "deploy-prod main --break-glass db is REALLY down")
    assert "You already asked to break the glass on `deploy-prod`" in again["text"]
    assert f"in <#{CHANNEL}>" in again["text"]
    requests = [p for p in slack.posts(CHANNEL) if "Approval needed" in p.args["text"]]
    assert len(requests) == 1
    assert len([p for p in slack.posts(CHANNEL) if "Break-glass" in p.args["text"]]) == 1
    entries = await audit_entries(redis_client)
    assert [e["detail"] for e in entries if e["outcome"] == "refused"] == ["break-glass: asked"]

    # Bob locks the pipeline meanwhile: the admin's approval is refused on its re-check.
    locked = await answer(bot, "/deploy", "lock deploy-prod hotfix of my own", user_id=BOB)
    assert "frozen" not in locked["text"]
    ts = requests[0].response["ts"]
    _, ok = await bot.click(
        "approval_approve", approve_value(slack, ts), channel=CHANNEL, message_ts=ts, user_id=ADMIN
    )
    answered = (await slack.wait_for(lambda: bot.response_texts(ok)))[0]
    assert "locked" in answered and "Started" not in answered
    assert bk.requests_to("POST") == []

    # Decided (refused): the requester may ask again, and that makes a new request.
    await answer(bot, "/deploy", "unlock deploy-prod", user_id=BOB)
    anew = await answer(bot, "/deploy", "deploy-prod --break-glass db is still down")
    assert "Approval requested in the channel" in anew["text"]
    assert len([p for p in slack.posts(CHANNEL) if "Approval needed" in p.args["text"]]) == 2


async def test_break_glass_whose_only_approver_is_the_requester_is_refused(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    """The admins are the break-glass approvers of a rule without any; when Alice is the only
    admin, nobody else could approve hers: refused at once, no request left to expire."""
    path = tmp_path / "policy.yml"
    path.write_text(POLICY.replace(f"admins: [{ADMIN}]", f"admins: [{ALICE}]"))
    bk.add_pipeline("deploy-prod", default_branch="main")
    tuning = dataclasses.replace(FAST, clock=Clock(LAST_MINUTE))
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(path)) as bot:
        reply = await answer(bot, "/deploy", "deploy-prod --break-glass db is down")
        assert "needs a second person to approve it" in reply["text"]
        assert "names nobody but you" in reply["text"]
        assert [p for p in slack.posts(CHANNEL) if "Approval needed" in p.args["text"]] == []
        assert bk.requests_to("POST") == []
