"""The direct messages about a person's own builds: one when a build finishes, and the summary
of those held during their quiet hours."""

from __future__ import annotations

from collections.abc import Sequence

from app.slack.mrkdwn import code
from app.slack.render.common import (
    SECTION_TEXT_LIMIT,
    Rendered,
    build_title,
    clip,
    duration,
    one_section,
    state_emoji,
    state_label,
)
from buildkite.models import Build

#: A summary lists at most this many builds, then says how many more.
MAX_SUMMARY_LINES = 30


def final_line(pipeline: str, build: Build) -> str:
    """One line about a finished build: its state, title, branch and how long it took."""
    took = duration(build)
    when = f" in {took}" if took else ""
    label = state_label(build.state.value).lower()
    branch = code(clip(build.branch or "?", 100))
    return (
        f"{state_emoji(build.state.value)} {build_title(pipeline, build)} {label}{when} ({branch})"
    )


def final_dm(line: str) -> Rendered:
    return one_section(line)


def summary_dm(lines: Sequence[str]) -> Rendered:
    """The held lines, whole ones only: a line cut at the section's limit could end inside a
    link's `<url|label>` and show as broken markup; those that do not fit are counted instead."""
    head = "While your quiet hours lasted:" if len(lines) != 1 else "During your quiet hours:"
    room = SECTION_TEXT_LIMIT - len(head) - len("\n…and 99999 more.")
    shown: list[str] = []
    for line in lines[:MAX_SUMMARY_LINES]:
        bullet = f"• {line}"
        if len(bullet) + 1 > room:
            break
        room -= len(bullet) + 1
        shown.append(bullet)
    if len(lines) > len(shown):
        shown.append(f"…and {len(lines) - len(shown)} more.")
    return one_section(head + "\n" + "\n".join(shown))
