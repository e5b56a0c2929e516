"""Slack drawn for a terminal: mrkdwn as plain text, emoji as characters, blocks as lines."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

#: The Slack emoji the bot uses, drawn for a terminal: name, then emoji.
_EMOJI = """
hourglass_flowing_sand ⏳  hourglass ⌛  arrow_forward ▶️  warning ⚠️  white_check_mark ✅  x ❌
no_entry ⛔  no_entry_sign 🚫  double_vertical_bar ⏸️  fast_forward ⏩  heavy_minus_sign ➖
repeat 🔁  lock 🔒  unlock 🔓  rocket 🚀  boom 💥  raised_hand ✋  octagonal_sign 🛑  scroll 📜
building_construction 🏗️  white_circle ⚪  large_green_circle 🟢  wastebasket 🗑️  shield 🛡️
robot_face 🤖  bar_chart 📊  information_source ℹ️
"""  # noqa: RUF001
EMOJI = dict(zip(_EMOJI.split()[::2], _EMOJI.split()[1::2], strict=True))


#: Draws one button of an actions block: the element, then the block holding it.
ButtonDrawer = Callable[[dict[str, Any], dict[str, Any]], str]


def draw(content: dict[str, Any], slack: Any, button: ButtonDrawer) -> str:
    """A message's blocks (or its text) as terminal lines; `button` draws each button."""
    lines: list[str] = []
    for block in content.get("blocks") or []:
        kind = block.get("type")
        if kind in ("section", "header") and block.get("text"):
            lines.append(render_text(block["text"].get("text", ""), slack))
        if kind == "section" and block.get("fields"):
            fields = [render_text(f.get("text", ""), slack) for f in block["fields"]]
            lines.append(" · ".join(f.replace("\n", ": ", 1) for f in fields))
        elif kind == "context":
            texts = [e.get("text", "") for e in block.get("elements", []) if "text" in e]
            lines.append(render_text(" ".join(texts), slack))
        elif kind == "actions":
            lines.append(" · ".join(button(e, block) for e in block["elements"]))
        elif kind == "divider":
            lines.append("───")
    if not lines:
        lines.append(render_text(str(content.get("text", "")), slack))
    return "\n".join(lines)


def render_text(text: str, slack: Any, *, tz: tzinfo | None = None) -> str:
    """Slack mrkdwn for a terminal, as Slack shows it: links as `label (url)`, users and channels
    by name, dates in the reader's time zone (`tz`, by default this machine's), emoji drawn."""

    def mention(match: re.Match[str]) -> str:
        user = slack.users.get(match.group(1), {})
        return "@" + str(user.get("name", match.group(1)))

    def channel(match: re.Match[str]) -> str:
        if match.group(2):  # the name the message gives wins, as in Slack
            return "#" + match.group(2)
        known = slack.channels.get(match.group(1), {})
        return "#" + str(known.get("name") or match.group(1))

    text = re.sub(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>", mention, text)
    text = re.sub(r"<#([CG][A-Z0-9]+)(?:\|([^>]*))?>", channel, text)
    text = re.sub(r"<!date\^([^>]*)>", lambda m: slack_date(m.group(1), tz), text)
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", r"\2 (\1)", text)
    text = re.sub(r"<(https?://[^>]+)>", r"\1", text)
    text = re.sub(r":([a-z0-9_+-]+):", lambda m: EMOJI.get(m.group(1), m.group(0)), text)
    text = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"\1", text)
    return html.unescape(text)


_DATE_TOKEN = re.compile(r"\{([a-z_]+)\}")


def slack_date(inner: str, tz: tzinfo | None = None, now: datetime | None = None) -> str:
    """`<!date^…>` as Slack shows it: the inside is `timestamp^format[^link]|fallback`, and the
    format's tokens ({date_num}, {date_slash}, {date}, {date_short}, {date_long},
    {date_long_full}, the `_pretty` forms, {day_divider_pretty}, {time}, {time_secs}, {ago}) are
    filled in the reader's time zone; anything unreadable shows the
    fallback text, as a client that cannot format it would."""
    body, _, fallback = inner.partition("|")
    parts = body.split("^")
    if len(parts) < 2 or not re.fullmatch(r"-?[0-9]{1,12}", parts[0]):
        return fallback
    try:
        moment = datetime.fromtimestamp(int(parts[0]), tz=tz).astimezone(tz)
    except (OverflowError, OSError, ValueError):
        return fallback
    today = (now or datetime.now(tz=moment.tzinfo)).date()
    known = True

    def token(match: re.Match[str]) -> str:
        nonlocal known
        value = _date_token(match.group(1), moment, today)
        if value is None:
            known = False
            return match.group(0)
        return value

    shown = _DATE_TOKEN.sub(token, parts[1])
    if not known:
        return fallback
    if len(parts) > 2 and parts[2].startswith(("http://", "https://")):
        shown = f"{shown} ({parts[2]})"
    return shown


def _date_token(name: str, moment: datetime, today: date) -> str | None:
    day = moment.day
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    long_date = f"{moment:%B} {day}{suffix}, {moment:%Y}"
    dates = {
        "date_num": f"{moment:%Y-%m-%d}",
        "date": long_date,
        "date_short": f"{moment:%b} {day}, {moment:%Y}",
        "date_long": f"{moment:%A}, {long_date}",
        "date_long_full": f"{moment:%B} {day}, {moment:%Y}",
        "date_slash": f"{moment:%d/%m/%Y}",
    }
    relative = {today: "today", today - timedelta(days=1): "yesterday"}
    relative[today + timedelta(days=1)] = "tomorrow"
    if name in dates:
        return dates[name]
    if name.endswith("_pretty") and name.removesuffix("_pretty") in dates:
        return relative.get(moment.date()) or dates[name.removesuffix("_pretty")]
    if name == "day_divider_pretty":
        if moment.date() in relative:
            return relative[moment.date()]
        this_year = moment.year == today.year
        return (
            dates["date_long"].removesuffix(f", {moment:%Y}") if this_year else dates["date_long"]
        )
    clock = f"{moment:%I}".lstrip("0") + f":{moment:%M}"
    if name == "time":
        return f"{clock} {moment:%p}"
    if name == "time_secs":
        return f"{clock}:{moment:%S} {moment:%p}"
    if name == "ago":
        return _ago(moment, datetime.now(tz=moment.tzinfo))
    return None


def _ago(moment: datetime, now: datetime) -> str:
    seconds = int((now - moment).total_seconds())
    future, seconds = seconds < 0, abs(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = seconds // size
            words = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"in {words}" if future else f"{words} ago"
    return "in a few seconds" if future else "a few seconds ago"


def indent(label: str, body: str) -> str:
    """`  label: body` for one line, else the label over the body's indented lines."""
    lines = body.splitlines() or [""]
    if len(lines) == 1:
        return f"  {label}: {lines[0]}"
    return f"  {label}:\n" + "\n".join(f"    {line}" for line in lines)
