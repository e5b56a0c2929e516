"""Freeze windows: when deploys of matching pipelines are refused (weekly or from/to, in an IANA
time zone), the freeze in force at a moment, and the next ones.

Times are computed as wall-clock times in the freeze's zone and compared as instants, so that
"fri 16:00 - mon 08:00" in Europe/Berlin ends at 08:00 local time whether or not the clocks
changed over the weekend. Nothing here reads the clock: every function takes `now`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.slack.render import freezes as render
from app.slack.render.freezes import FreezeView

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_WEEKLY = re.compile(
    r"^\s*(?P<d1>[a-z]+)\s+(?P<t1>[0-9]{1,2}:[0-9]{2})\s*-\s*"
    r"(?P<d2>[a-z]+)\s+(?P<t2>[0-9]{1,2}:[0-9]{2})\s*$"
)
_CHANNEL = re.compile(r"^(?:[CG][A-Z0-9]{2,}|#[a-z0-9][a-z0-9._-]{0,79})$")
_PIPELINE_GLOB = re.compile(r"^[a-z0-9*?\[\]!_.-]{1,100}$")
WEEK = dt.timedelta(days=7)
#: The policy actions a freeze refuses (a rollback and a promotion are deploys); cancel and
#: unblock go on.
FROZEN_ACTIONS = frozenset({"deploy", "rebuild"})
#: At most this many freezes that follow each other without a gap are looked through for the
#: moment deploys may go again.
MAX_CHAIN = 20
#: How far ahead `/deploy freezes` looks for the next occurrence of each freeze.
UPCOMING = dt.timedelta(days=60)


@dataclass(frozen=True)
class WeeklyWindow:
    """From a weekday and time to a weekday and time, every week (wall-clock times)."""

    start_day: int
    start: dt.time
    end_day: int
    end: dt.time

    @property
    def length_days(self) -> int:
        """Whole days from the start's date to the end's date (0 to 7)."""
        days = (self.end_day - self.start_day) % 7
        if days == 0 and self.end <= self.start:
            days = 7
        return days


def _day(word: str) -> int:
    if word in _DAYS:
        return _DAYS.index(word)
    if word in _FULL_DAYS:
        return _FULL_DAYS.index(word)
    raise ValueError(f"{word!r} is not a day of the week (mon, tue, wed, thu, fri, sat, sun)")


def _moment(day: str, word: str) -> tuple[int, dt.time]:
    """A weekday and a time; `24:00` is the end of that day, the next day's 00:00."""
    hours, minutes = (int(p) for p in word.split(":"))
    if (hours, minutes) == (24, 0):
        return (_day(day) + 1) % 7, dt.time()
    if hours > 23 or minutes > 59:
        raise ValueError(f"{word!r} is not a time of day (00:00 to 24:00)")
    return _day(day), dt.time(hours, minutes)


def parse_weekly(text: str) -> WeeklyWindow:
    """`fri 16:00 - mon 08:00` as a `WeeklyWindow`; ValueError with a sentence if it is not one."""
    match = _WEEKLY.match(text.lower())
    if not match:
        raise ValueError(
            f'{text!r} is not a weekly window like "fri 16:00 - mon 08:00" '
            "(a day and a 24-hour time, a dash, a day and a time)"
        )
    window = WeeklyWindow(*_moment(match["d1"], match["t1"]), *_moment(match["d2"], match["t2"]))
    if window.start_day == window.end_day and window.start == window.end:
        raise ValueError(f"{text!r} starts when it ends: a weekly window is shorter than a week")
    return window


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a name such as "America" is a directory of the database, not a zone.
        raise ValueError(
            f"{name!r} is not an IANA time zone (such as UTC, Europe/Berlin, America/New_York)"
        ) from None


def _wall_time(value: Any) -> Any:
    """YAML gives `2026-12-22` as a date and `2026-12-22T00:00:00` as a datetime, but
    `2026-12-22T00:00` as a string: all three are read as a wall-clock time."""
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time())
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not a date and time like 2026-12-22T00:00 (or 2026-12-22)"
            ) from None
    return value


@dataclass(frozen=True)
class Occurrence:
    """One occurrence of a freeze, as instants (aware, UTC)."""

    freeze: Freeze
    start: dt.datetime
    end: dt.datetime
    #: When deploys may go again, if other freezes follow on without a gap (see active_freeze),
    #: and the last of them.
    then: Occurrence | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """Stable across processes that load the same policy: the freeze's and the start's."""
        return f"{self.freeze.key}:{int(self.start.timestamp())}"

    def active(self, now: dt.datetime) -> bool:
        return self.start <= now < self.end


class Freeze(BaseModel):
    """A freeze of the pipelines matching `pipelines` (slugs or globs), weekly or from/to."""

    model_config = ConfigDict(extra="forbid")

    pipelines: list[str] = Field(min_length=1)
    weekly: str | None = None
    starts: dt.datetime | None = Field(default=None, alias="from")
    ends: dt.datetime | None = Field(default=None, alias="to")
    timezone: str = "UTC"
    reason: str = Field(min_length=1, max_length=300)
    #: Where its start and end are announced; by default the channels of the pipelines it covers.
    channels: list[str] | None = None

    @field_validator("pipelines")
    @classmethod
    def _pipelines(cls, values: list[str]) -> list[str]:
        for value in values:
            if not _PIPELINE_GLOB.match(value):
                raise ValueError(
                    f"{value!r} is not a pipeline slug or glob (lowercase letters, digits, - "
                    "and the globs * ? [...])"
                )
        return values

    @field_validator("weekly")
    @classmethod
    def _weekly(cls, value: str | None) -> str | None:
        if value is not None:
            parse_weekly(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        _zone(value)
        return value

    @field_validator("starts", "ends", mode="before")
    @classmethod
    def _times(cls, value: Any) -> Any:
        return _wall_time(value)

    @field_validator("channels")
    @classmethod
    def _channels(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if not _CHANNEL.match(value):
                raise ValueError(f"{value!r} is neither a channel id (C…) nor a #channel-name")
        return values

    @field_validator("reason")
    @classmethod
    def _reason(cls, value: str) -> str:
        if any(ord(c) < 32 for c in value):
            raise ValueError("the reason must be one line of text")
        return value

    @model_validator(mode="after")
    def _one_window(self) -> Freeze:
        absolute = self.starts is not None or self.ends is not None
        if self.weekly is not None and absolute:
            raise ValueError("a freeze is either weekly or from/to, not both")
        if self.weekly is None and not absolute:
            raise ValueError('a freeze needs a window: weekly: "fri 16:00 - mon 08:00", or from/to')
        if absolute:
            if self.starts is None or self.ends is None:
                raise ValueError("a from/to freeze needs both from and to")
            if self._instant(self.starts) >= self._instant(self.ends):
                raise ValueError("the freeze ends (to) before it starts (from)")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.timezone)

    @property
    def window(self) -> str:
        """The window as the policy says it, for people."""
        if self.weekly is not None:
            return f"weekly {self.weekly.strip()}, {self.timezone}"
        assert self.starts is not None and self.ends is not None
        return f"from {_shown(self.starts)} to {_shown(self.ends)}, {self.timezone}"

    @property
    def key(self) -> str:
        """A short id of the freeze's definition, the same in every process."""
        text = "\x1f".join([",".join(self.pipelines), self.window, self.reason])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def covers(self, pipeline: str) -> bool:
        return any(fnmatch.fnmatchcase(pipeline, p) for p in self.pipelines)

    def _instant(self, wall: dt.datetime) -> dt.datetime:
        """A wall-clock time in the freeze's zone (or an aware time as given), in UTC: the
        first instant at which the zone's clocks read it or later. A time the clocks repeat is
        its first reading; a time they skip is the instant they jump over it."""
        if wall.tzinfo is not None:
            return wall.astimezone(dt.UTC)
        return _first_reading(wall, self.zone)

    def occurrences(self, after: dt.datetime, until: dt.datetime) -> Iterator[Occurrence]:
        """The occurrences that overlap [after, until), in order (both aware)."""
        if self.weekly is None:
            assert self.starts is not None and self.ends is not None
            start, end = self._instant(self.starts), self._instant(self.ends)
            if end > after and start < until:
                yield Occurrence(self, start, end)
            return
        window = parse_weekly(self.weekly)
        zone = self.zone
        # Start a week early: the occurrence in force at `after` began up to a week before it.
        day = (after.astimezone(zone) - WEEK).date()
        last = until.astimezone(zone).date()
        while day <= last:
            if day.weekday() == window.start_day:
                start_wall = dt.datetime.combine(day, window.start)
                end_wall = dt.datetime.combine(
                    day + dt.timedelta(days=window.length_days), window.end
                )
                start, end = self._instant(start_wall), self._instant(end_wall)
                if end > after and start < until:
                    yield Occurrence(self, start, end)
            day += dt.timedelta(days=1)


def _first_reading(wall: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The first instant at which the clocks of `zone` read `wall` (naive) or later."""
    before = wall.replace(tzinfo=zone, fold=0).astimezone(dt.UTC)
    if before.astimezone(zone).replace(tzinfo=None) == wall:
        return before  # it exists (and, if repeated, this is its first reading)
    # Skipped: with the offset after the jump it maps before the jump, with the one before it
    # maps after. The jump lies between: the first second whose local time is past `wall`.
    low = wall.replace(tzinfo=zone, fold=1).astimezone(dt.UTC)
    low, high = min(low, before), max(low, before)
    while high - low > dt.timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


def _shown(wall: dt.datetime) -> str:
    return wall.strftime("%Y-%m-%d %H:%M")


def utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _all_in_force(
    freezes: Sequence[Freeze], pipeline: str, moment: dt.datetime
) -> list[Occurrence]:
    return [
        occurrence
        for freeze in freezes
        if freeze.covers(pipeline)
        for occurrence in freeze.occurrences(moment, moment + dt.timedelta(seconds=1))
        if occurrence.active(moment)
    ]


def _in_force(freezes: Sequence[Freeze], pipeline: str, moment: dt.datetime) -> Occurrence | None:
    return max(_all_in_force(freezes, pipeline, moment), key=lambda o: o.end, default=None)


def freezes_in_force(freezes: Sequence[Freeze], pipeline: str, now: float) -> list[Occurrence]:
    """Every freeze occurrence in force on `pipeline` at `now` (unix seconds), overlapping ones
    included: a break-glass approval must have been asked in each of them."""
    return _all_in_force(freezes, pipeline, utc(now))


def active_freeze(freezes: Sequence[Freeze], pipeline: str, now: float) -> Occurrence | None:
    """The freeze in force on `pipeline` at `now` (unix seconds); of several, the one that ends
    last. When another freeze starts as (or before) it ends, deploys stay refused: `then` is
    the last freeze of that chain, whose end is when they may go again."""
    current = _in_force(freezes, pipeline, utc(now))
    if current is None:
        return None
    last = current
    for _ in range(MAX_CHAIN):
        following = _in_force(freezes, pipeline, last.end)
        if following is None or following.end <= last.end:
            break
        last = following
    return replace(current, then=last) if last is not current else current


def current_and_upcoming(
    freezes: Sequence[Freeze], now: float, *, ahead: dt.timedelta = UPCOMING
) -> tuple[list[Occurrence], list[Occurrence]]:
    """The occurrences in force at `now`, and each freeze's next one within `ahead`."""
    moment = utc(now)
    active: list[Occurrence] = []
    upcoming: list[Occurrence] = []
    for freeze in freezes:
        later = None
        for occurrence in freeze.occurrences(moment, moment + ahead):
            if occurrence.active(moment):
                active.append(occurrence)
            elif later is None and occurrence.start > moment:
                later = occurrence
        if later is not None:
            upcoming.append(later)
    return sorted(active, key=lambda o: o.end), sorted(upcoming, key=lambda o: o.start)


def local_text(occurrence: Occurrence, instant: dt.datetime) -> str:
    """An instant as a wall-clock time in the freeze's zone, such as `Mon 30 Mar 08:00 CEST`:
    the fallback of a Slack date token."""
    return instant.astimezone(occurrence.freeze.zone).strftime("%a %d %b %Y %H:%M %Z")


def view_of(occurrence: Occurrence) -> FreezeView:
    """An occurrence as the renderers show it."""
    freeze = occurrence.freeze
    return FreezeView(
        reason=freeze.reason,
        window=freeze.window,
        pipelines=tuple(freeze.pipelines),
        start=occurrence.start.timestamp(),
        end=occurrence.end.timestamp(),
        start_text=local_text(occurrence, occurrence.start),
        end_text=local_text(occurrence, occurrence.end),
        then=view_of(occurrence.then) if occurrence.then is not None else None,
    )


def freeze_refusal(
    freezes: Sequence[Freeze], pipeline: str, now: float, *, action: str = "deploy"
) -> str | None:
    """Why `action` (deploy, rebuild, rollback, promotion) of `pipeline` is refused at `now`
    (unix seconds): the freeze, its reason and when it ends; None when nothing is frozen."""
    occurrence = active_freeze(freezes, pipeline, now)
    return render.frozen(pipeline, action, view_of(occurrence)) if occurrence else None


def freezes_listing(freezes: Sequence[Freeze], now: float) -> str:
    """`/deploy freezes`: the freezes in force at `now`, and each one's next occurrence."""
    active, upcoming = current_and_upcoming(freezes, now)
    return render.freezes_list([view_of(o) for o in active], [view_of(o) for o in upcoming])
