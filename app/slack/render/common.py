"""What every renderer shares: the rendered message, clipping to Block Kit's limits, the
states' labels and emoji, and the one-line section and context blocks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View

from app.slack.ids import ActionId, BlockId
from app.slack.mrkdwn import escape, link
from buildkite.models import Build

SECTION_TEXT_LIMIT = 3000
FIELD_TEXT_LIMIT = 2000


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


def clip(text: str, limit: int) -> str:
    """Cut to `limit` characters, without splitting an escaped entity like `&amp;`."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    amp = cut.rfind("&")
    if amp != -1 and ";" not in cut[amp:] and len(cut) - amp < 6:
        cut = cut[:amp]
    return cut + "…"


def state_emoji(key: str) -> str:
    """The emoji of a state key; a state this code does not know gets a question mark."""
    return STATE_EMOJI.get(key, ":grey_question:")


def state_label(key: str) -> str:
    """The label of a state key; a state this code does not know is shown as Buildkite sent it."""
    return STATE_LABEL.get(key) or escape(key)


def state_key(build: Build) -> str:
    return "blocked" if build.is_waiting_on_block and not build.is_final else build.state.value


def state_text(build: Build) -> str:
    key = state_key(build)
    return f"{state_emoji(key)} {state_label(key)}"


def short_commit(commit: str | None) -> str:
    if not commit:
        return "HEAD"
    return commit if commit == "HEAD" else commit[:7]


def seconds_text(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def duration(build: Build) -> str | None:
    start: datetime | None = build.started_at or build.created_at
    end = build.finished_at
    if start is None or end is None:
        return None
    return seconds_text(int((end - start).total_seconds()))


def build_title(pipeline: str, build: Build) -> str:
    """`pipeline #number`, linked to the build."""
    return link(build.web_url, f"{pipeline} #{build.number}")


def section(text: str) -> dict[str, Any]:
    """A section block of mrkdwn, clipped to what a section holds."""
    return SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict()


def context(text: str) -> dict[str, Any]:
    """A context block (small grey text) of mrkdwn."""
    return ContextBlock(
        elements=[MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))]
    ).to_dict()


def one_section(text: str) -> Rendered:
    """A message of one section; Slack shows mrkdwn in notifications' fallback text too."""
    text = clip(text, SECTION_TEXT_LIMIT)
    return Rendered(text=text, blocks=[SectionBlock(text=MarkdownTextObject(text=text)).to_dict()])


def notice(text: str) -> Rendered:
    """A short ephemeral answer to the person who typed or clicked."""
    return one_section(text)


def cost(requests: int) -> str:
    """What a page cost, in Buildkite API requests."""
    return f"{requests} Buildkite API request{'s' if requests != 1 else ''}"


def more_button(action_id: ActionId, value: BaseModel, block_id: BlockId) -> dict[str, Any]:
    """The "More" button under a page of a list; `value` says which page comes next."""
    return ActionsBlock(
        block_id=block_id,
        elements=[ButtonElement(text="More", action_id=action_id, value=value.model_dump_json())],
    ).to_dict()


def modal_notice(title: str, text: str) -> dict[str, Any]:
    """A modal that only says something: progress, or the outcome of a submission."""
    view = View(type="modal", title=clip(title, 24), close="Close", blocks=[section(text)])
    return view.to_dict()
