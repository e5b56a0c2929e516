"""Block Kit renderers: pure functions from typed models to the JSON posted to Slack.

Every message the bot writes is built here, so a test can assert on its exact JSON, and every
user-supplied string is escaped and clipped to Block Kit's limits here, once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from buildkite.models import Build, BuildState, Job

SECTION_TEXT_LIMIT = 3000
FIELD_TEXT_LIMIT = 2000
MAX_FAILED_JOBS_LISTED = 10


class ActionId(StrEnum):
    """The action_id of every button the bot renders."""

    CANCEL = "build_cancel"
    REBUILD = "build_rebuild"
    OPEN = "build_open"


class BuildButtonValue(BaseModel):
    """What a build button carries in its `value`: validated again when clicked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,99}$")
    number: int = Field(gt=0, lt=10**9)


@dataclass(frozen=True)
class Rendered:
    """A message ready for chat.postMessage / chat.update: fallback text plus blocks."""

    text: str
    blocks: list[dict[str, Any]]

    def digest(self) -> str:
        """A short fingerprint of the content, to skip edits that would change nothing."""
        data = json.dumps([self.text, self.blocks], sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:16]


STATE_EMOJI: dict[str, str] = {
    "creating": ":hourglass_flowing_sand:",
    "scheduled": ":hourglass_flowing_sand:",
    "running": ":arrow_forward:",
    "failing": ":warning:",
    "passed": ":white_check_mark:",
    "failed": ":x:",
    "blocked": ":double_vertical_bar:",
    "canceling": ":no_entry_sign:",
    "canceled": ":no_entry_sign:",
    "skipped": ":fast_forward:",
    "not_run": ":heavy_minus_sign:",
}

STATE_LABEL: dict[str, str] = {
    "creating": "Creating",
    "scheduled": "Scheduled",
    "running": "Running",
    "failing": "Failing",
    "passed": "Passed",
    "failed": "Failed",
    "blocked": "Waiting on a block step",
    "canceling": "Canceling",
    "canceled": "Canceled",
    "skipped": "Skipped",
    "not_run": "Not run",
}


def escape(text: str) -> str:
    """Escape the three characters Slack's mrkdwn treats as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def link(url: str | None, label: str) -> str:
    label = escape(label).replace("|", "¦")
    return f"<{url}|{label}>" if url else label


def state_key(build: Build) -> str:
    return "blocked" if build.is_waiting_on_block and not build.is_final else build.state.value


def state_text(build: Build) -> str:
    key = state_key(build)
    return f"{STATE_EMOJI[key]} {STATE_LABEL[key]}"


def short_commit(commit: str | None) -> str:
    if not commit:
        return "HEAD"
    return commit if commit == "HEAD" else commit[:7]


def duration(build: Build) -> str | None:
    start: datetime | None = build.started_at or build.created_at
    end = build.finished_at
    if start is None or end is None:
        return None
    seconds = max(0, int((end - start).total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def _title(pipeline: str, build: Build) -> str:
    return link(build.web_url, f"{pipeline} #{build.number}")


def build_message(pipeline: str, build: Build, requester: str) -> Rendered:
    """The one message per build, updated in place on every state change."""
    value = BuildButtonValue(pipeline=pipeline, number=build.number).model_dump_json()
    title = _title(pipeline, build)
    fields = [
        f"*State*\n{state_text(build)}",
        f"*Branch*\n`{escape(clip(build.branch or '?', 200))}`",
        f"*Commit*\n`{escape(short_commit(build.commit))}`",
        f"*Requested by*\n<@{requester}>",
    ]
    took = duration(build)
    if took and build.is_final:
        fields.append(f"*Duration*\n{took}")
    blocks: list[dict[str, Any]] = [
        SectionBlock(
            text=MarkdownTextObject(text=f"*{title}*"),
            fields=[MarkdownTextObject(text=clip(f, FIELD_TEXT_LIMIT)) for f in fields],
        ).to_dict()
    ]
    if build.message:
        blocks.append(
            ContextBlock(
                elements=[MarkdownTextObject(text=escape(clip(build.message, SECTION_TEXT_LIMIT)))]
            ).to_dict()
        )
    buttons = []
    if not build.is_final and build.state not in {BuildState.CANCELING}:
        buttons.append(
            ButtonElement(
                text="Cancel",
                action_id=ActionId.CANCEL,
                value=value,
                style="danger",
                confirm=ConfirmObject(
                    title="Cancel this build?",
                    text=f"Cancel {pipeline} #{build.number}?",
                    confirm="Cancel build",
                    deny="Keep it running",
                ),
            )
        )
    if build.is_final:
        buttons.append(ButtonElement(text="Rebuild", action_id=ActionId.REBUILD, value=value))
    buttons.append(
        ButtonElement(text="Open in Buildkite", action_id=ActionId.OPEN, url=build.web_url)
    )
    blocks.append(ActionsBlock(block_id="build_actions", elements=buttons).to_dict())
    text = f"{pipeline} #{build.number}: {STATE_LABEL[state_key(build)]}"
    return Rendered(text=text, blocks=blocks)


def running_reply(pipeline: str, build: Build) -> Rendered:
    text = f":arrow_forward: {_title(pipeline, build)} started running."
    return _section(text)


def failing_reply(pipeline: str, build: Build) -> Rendered:
    text = f":warning: {_title(pipeline, build)} is failing: a job has failed, others still run."
    return _section(text)


def final_reply(
    pipeline: str, build: Build, requester: str, failed_jobs: list[Job] | None = None
) -> Rendered:
    """The thread reply at a build's final state; it mentions the requester."""
    label = STATE_LABEL[build.state.value].lower()
    took = duration(build)
    when = f" in {took}" if took else ""
    text = (
        f"<@{requester}> {STATE_EMOJI[build.state.value]} {_title(pipeline, build)} {label}{when}."
    )
    if build.state is BuildState.FAILED and failed_jobs:
        listed = failed_jobs[:MAX_FAILED_JOBS_LISTED]
        lines = [f"• {link(job.web_url, clip(job.display_name, 150))}" for job in listed]
        if len(failed_jobs) > len(listed):
            lines.append(f"• …and {len(failed_jobs) - len(listed)} more")
        text += "\n*Failed jobs:*\n" + "\n".join(lines)
    return _section(text)


def _section(text: str) -> Rendered:
    text = clip(text, SECTION_TEXT_LIMIT)
    plain = text  # Slack shows mrkdwn in notifications' fallback text too.
    return Rendered(text=plain, blocks=[SectionBlock(text=MarkdownTextObject(text=text)).to_dict()])


def notice(text: str) -> Rendered:
    """A short ephemeral answer to the person who typed or clicked."""
    return _section(text)
