"""Slack drawn for a terminal: mrkdwn as plain text, emoji as characters, blocks as lines."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
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


def draw(content: dict[str, Any], slack: Any, button: Callable[[dict[str, Any]], str]) -> str:
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
            lines.append(" · ".join(button(e) for e in block["elements"]))
        elif kind == "divider":
            lines.append("───")
    if not lines:
        lines.append(render_text(str(content.get("text", "")), slack))
    return "\n".join(lines)


def render_text(text: str, slack: Any) -> str:
    """Slack mrkdwn for a terminal: links as `label (url)`, mentions by name, emoji drawn."""

    def mention(match: re.Match[str]) -> str:
        user = slack.users.get(match.group(1), {})
        return "@" + str(user.get("name", match.group(1)))

    text = re.sub(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>", mention, text)
    text = re.sub(r"<#C[A-Z0-9]+\|([^>]+)>", r"#\1", text)
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", r"\2 (\1)", text)
    text = re.sub(r"<(https?://[^>]+)>", r"\1", text)
    text = re.sub(r":([a-z0-9_+-]+):", lambda m: EMOJI.get(m.group(1), m.group(0)), text)
    text = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"\1", text)
    return html.unescape(text)


def indent(label: str, body: str) -> str:
    """`  label: body` for one line, else the label over the body's indented lines."""
    lines = body.splitlines() or [""]
    if len(lines) == 1:
        return f"  {label}: {lines[0]}"
    return f"  {label}:\n" + "\n".join(f"    {line}" for line in lines)
