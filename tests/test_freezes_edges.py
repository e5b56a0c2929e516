"""Freeze windows at their edges: a wall-clock edge the clocks skip or repeat, `24:00`, and
freezes that overlap or follow each other without a gap (a deploy waits for the last one)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path
from typing import Any, cast

import pytest

from app.core.freeze_announcements import FreezeAnnouncer
from app.core.freezes import Freeze, active_freeze, freeze_refusal, parse_weekly
from app.core.policy import load_policy
from app.simulators.bot import FAST, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack.render import freezes as render
from app.slack.render.common import notice
from app.storage import keys
from app.tuning import DEFAULT
from tests.clocks import Clock


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


def weekly(window: str, zone: str, **extra: Any) -> Freeze:
    return Freeze.model_validate(
        {"pipelines": ["deploy-*"], "weekly": window, "timezone": zone, "reason": "r", **extra}
    )


def once(start: str, end: str, reason: str, pipelines: list[str] | None = None) -> Freeze:
    return Freeze.model_validate(
        {"pipelines": pipelines or ["deploy-*"], "from": start, "to": end, "reason": reason}
    )


@pytest.mark.parametrize(
    ("zone", "jump_utc"),
    [
        # 02:00 CET jumps to 03:00 CEST at 01:00 UTC; 02:00 EST to 03:00 EDT at 07:00 UTC.
        ("Europe/Berlin", dt.datetime(2026, 3, 29, 1, tzinfo=dt.UTC)),
        ("America/New_York", dt.datetime(2026, 3, 8, 7, tzinfo=dt.UTC)),
    ],
)
def test_an_edge_the_clocks_skip_is_the_moment_they_jump_over_it(
    zone: str, jump_utc: dt.datetime
) -> None:
    """A freeze from 02:30 on the spring-forward Sunday starts when the clocks jump from 02:00
    to 03:00 (the first moment it is 02:30 or later), not half an hour after; one that ends at
    02:30 ends then too."""
    starts = weekly("sun 02:30 - sun 05:00", zone)
    jump = jump_utc.timestamp()
    assert active_freeze([starts], "deploy-prod", jump - 1) is None
    occurrence = active_freeze([starts], "deploy-prod", jump)
    assert occurrence is not None and occurrence.start == jump_utc
    assert occurrence.start.astimezone(starts.zone).strftime("%H:%M") == "03:00"
    ends = weekly("sat 12:00 - sun 02:30", zone)
    assert active_freeze([ends], "deploy-prod", jump - 1) is not None
    assert active_freeze([ends], "deploy-prod", jump) is None
    # The week after, 02:30 exists again and is the edge.
    later = active_freeze([starts], "deploy-prod", jump + 7 * 86400 + 1800)
    assert later is not None
    assert later.start.astimezone(starts.zone).strftime("%H:%M") == "02:30"


def test_an_edge_the_clocks_repeat_is_its_first_reading() -> None:
    """Berlin, 25 October 2026: 02:30 happens at 00:30 UTC (CEST) and again at 01:30 (CET)."""
    freeze = weekly("sun 02:30 - sun 05:00", "Europe/Berlin")
    assert active_freeze([freeze], "deploy-prod", at(2026, 10, 25, 0, 29)) is None
    occurrence = active_freeze([freeze], "deploy-prod", at(2026, 10, 25, 0, 30))
    assert occurrence is not None
    assert occurrence.start == dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC)
    assert occurrence.end == dt.datetime(2026, 10, 25, 4, tzinfo=dt.UTC)  # 05:00 CET


def test_a_from_to_edge_the_clocks_skip_is_the_jump_too() -> None:
    freeze = Freeze.model_validate(
        {
            "pipelines": ["*"],
            "from": "2026-03-08T02:30",
            "to": "2026-03-08T12:00",
            "timezone": "America/New_York",
            "reason": "r",
        }
    )
    assert active_freeze([freeze], "web", at(2026, 3, 8, 7)) is not None
    assert active_freeze([freeze], "web", at(2026, 3, 8, 7) - 1) is None


def test_24_00_is_the_end_of_the_day() -> None:
    window = parse_weekly("fri 16:00 - sun 24:00")
    assert (window.end_day, window.end) == (0, dt.time())
    freeze = weekly("fri 16:00 - sun 24:00", "UTC")
    # Sunday 29 November 2026 23:59 is frozen, Monday 00:00 is not.
    assert active_freeze([freeze], "deploy-prod", at(2026, 11, 29, 23, 59)) is not None
    assert active_freeze([freeze], "deploy-prod", at(2026, 11, 30)) is None
    assert parse_weekly("mon 24:00 - tue 08:00").length_days == 0


def test_back_to_back_freezes_refuse_until_the_last_one_ends() -> None:
    """A deploy refused at 11:00 by a freeze ending at 12:00, which a freeze from 12:00 to 14:00
    follows, then one from 13:00 to 15:00: deploys go again at 15:00, and the refusal says so."""
    first = once("2026-12-01T10:00", "2026-12-01T12:00", "first")
    second = once("2026-12-01T12:00", "2026-12-01T14:00", "second")
    third = once("2026-12-01T13:00", "2026-12-01T15:00", "third", pipelines=["deploy-prod"])
    freezes = [first, second, third]
    occurrence = active_freeze(freezes, "deploy-prod", at(2026, 12, 1, 11))
    assert occurrence is not None and occurrence.freeze.reason == "first"
    assert occurrence.then is not None and occurrence.then.freeze.reason == "third"
    text = freeze_refusal(freezes, "deploy-prod", at(2026, 12, 1, 11))
    assert text is not None
    assert f"until <!date^{int(at(2026, 12, 1, 12))}^" in text
    assert "`third` (from 2026-12-01 13:00 to 2026-12-01 15:00, UTC) until <!date^" in text
    assert f"<!date^{int(at(2026, 12, 1, 15))}^" in text
    # A pipeline the third does not cover waits until 14:00 only.
    other = active_freeze(freezes, "deploy-api", at(2026, 12, 1, 11))
    assert other is not None and other.then is not None
    assert other.then.end == dt.datetime(2026, 12, 1, 14, tzinfo=dt.UTC)
    for moment in (at(2026, 12, 1, 12), at(2026, 12, 1, 13, 59), at(2026, 12, 1, 14, 30)):
        assert active_freeze(freezes, "deploy-prod", moment) is not None
    assert active_freeze(freezes, "deploy-prod", at(2026, 12, 1, 15)) is None
    # A freeze with a gap before the next one is not chained.
    gap = [first, once("2026-12-01T12:01", "2026-12-01T14:00", "later")]
    alone = active_freeze(gap, "deploy-prod", at(2026, 12, 1, 11))
    assert alone is not None and alone.then is None


def test_of_two_overlapping_freezes_the_one_ending_last_is_named_with_its_end() -> None:
    long = once("2026-12-01T10:00", "2026-12-01T14:00", "long")
    short = once("2026-12-01T11:00", "2026-12-01T12:00", "short")
    occurrence = active_freeze([short, long], "deploy-prod", at(2026, 12, 1, 11, 30))
    assert occurrence is not None and occurrence.freeze.reason == "long"
    assert occurrence.then is None  # nothing in force at 14:00


def test_freezes_that_never_leave_a_gap_are_looked_through_a_bounded_number_of_times() -> None:
    halves = [
        weekly("mon 00:00 - thu 00:00", "UTC", reason="a"),
        weekly("thu 00:00 - mon 00:00", "UTC", reason="b"),
    ]
    occurrence = active_freeze(halves, "deploy-prod", at(2026, 12, 1, 12))
    assert occurrence is not None and occurrence.then is not None
    assert occurrence.then.end - occurrence.end < dt.timedelta(days=7 * 11)


def test_the_end_of_a_freeze_another_one_follows_does_not_say_deploys_may_go(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(
        "freezes:\n"
        "  - {pipelines: [deploy-prod], from: '2026-12-01T10:00', to: '2026-12-01T12:00',"
        " reason: first}\n"
        "  - {pipelines: ['deploy-*'], from: '2026-12-01T12:00', to: '2026-12-01T14:00',"
        " reason: second}\n"
        "  - {pipelines: [web], from: '2026-12-01T12:00', to: '2026-12-01T18:00', reason: web}\n"
    )
    policy = load_policy(path)
    announcer = FreezeAnnouncer(
        policy, cast(Any, None), cast(Any, None), DEFAULT.sweeps, lambda: at(2026, 12, 1, 12, 1)
    )
    first = next(policy.data.freezes[0].occurrences(*_day()))
    still = announcer._still_frozen(first)
    assert still is not None and still.freeze.reason == "second"  # not "web": not its pipeline
    from app.core.freezes import view_of

    text = render.freeze_ended(view_of(first), view_of(still))
    assert text.startswith(":snowflake: The freeze `first`")
    assert "but `second`" in text and "still refused" in text and "may be deployed" not in text
    second = next(policy.data.freezes[1].occurrences(*_day()))
    assert (
        FreezeAnnouncer(
            policy, cast(Any, None), cast(Any, None), DEFAULT.sweeps, lambda: at(2026, 12, 1, 14)
        )._still_frozen(second)
        is None
    )


def _day() -> tuple[dt.datetime, dt.datetime]:
    return (
        dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 2, tzinfo=dt.UTC),
    )


# -- announcements survive a replica that died between its claim and its post ------------------


async def test_an_announcement_claimed_by_a_replica_that_died_is_made_once(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(
        "freezes:\n"
        "  - {pipelines: [web], from: '2026-12-01T10:00', to: '2026-12-01T12:00', reason: a,"
        " channels: [C0ONE]}\n"
        "  - {pipelines: [api], from: '2026-12-01T10:00', to: '2026-12-01T12:00', reason: b,"
        " channels: [C0TWO]}\n"
    )
    clock = Clock(at(2026, 12, 1, 10, 1))
    sweeps = dataclasses.replace(FAST.sweeps, freeze_interval=3600, announce_lease=60)
    tuning = dataclasses.replace(FAST, clock=clock, sweeps=sweeps)
    one, two = (next(f.occurrences(*_day())) for f in load_policy(path).data.freezes)
    # A replica claimed both starts and died: it had posted in C0TWO, not yet in C0ONE.
    marks = {
        channel: keys.FREEZE_ANNOUNCED_KEY.format(
            occurrence=occurrence.key, edge="start", channel=channel
        )
        for occurrence, channel in ((one, "C0ONE"), (two, "C0TWO"))
    }
    for mark in marks.values():
        await redis_client.set(mark, f"try:{time.time() - 5}:{clock.now + 60}", ex=3600)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(path)) as bot:
        s = bot.services
        await s.outbox.post("C0TWO", notice("made"), key=f"freeze:{two.key}:start:C0TWO")
        sweep = FreezeAnnouncer(s.policy, s.store, s.outbox, sweeps, clock).sweep
        assert await sweep() == 0  # their lease runs still
        assert slack.posts("C0ONE") == []
        clock.now += 61
        await sweep()
        await sweep()
        await bot.settled()
        assert len(slack.posts("C0ONE")) == 1 and len(slack.posts("C0TWO")) == 1
        assert "A freeze starts: `a`" in slack.posts("C0ONE")[0].args["text"]
        assert [await redis_client.get(m) for m in marks.values()] == [b"done", b"done"]
