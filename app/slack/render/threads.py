"""What the bot answers when it is mentioned: in a build's thread (its commands), or anywhere
else (help)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slack_sdk.models.blocks import ActionsBlock, ButtonElement

from app.slack.ids import ActionId
from app.slack.mrkdwn import escape, typed
from app.slack.payloads import UnblockButtonValue
from app.slack.render.common import Rendered, build_title, clip, one_section, section
from buildkite.models import Build

COMMANDS_HELP = (
    "• `status`: the build's state, branch, commit and duration\n"
    "• `cancel`: cancel it while it runs\n"
    "• `rebuild`: start it again (followed in this thread)\n"
    "• `retry`: retry its failed jobs\n"
    "• `unblock`: unblock the step it waits on\n"
    "• `help`: this list"
)

THREAD_UNREADABLE = (
    "I could not read the first message of this thread, so I do not know which build it is "
    "about. Invite me to the channel (`/invite @buildkite`), or use the build's buttons."
)


def help_text(build: tuple[str, int] | None) -> Rendered:
    """What the bot can do here: a build's commands in its thread, how to get there elsewhere."""
    if build is not None:
        pipeline, number = build
        head = f"In this thread I act on *{escape(pipeline)} #{number}*. Mention me with:"
        return one_section(f"{head}\n{COMMANDS_HELP}")
    return one_section(
        "Mention me *in a build's thread* (under my build message, or a message I follow with "
        "the *Follow this build* shortcut) with one of:\n"
        f"{COMMANDS_HELP}\n"
        "Elsewhere, use `/deploy`, `/cancel`, `/rebuild` or `/buildkite`."
    )


def unknown_command(word: str, *, in_build_thread: bool) -> str:
    where = "" if in_build_thread else " in a build's thread"
    return f"I don't know `{typed(word)}`. Mention me{where} with one of:\n{COMMANDS_HELP}"


def cancel_requested(user: str, build: Build, pipeline: str) -> Rendered:
    return one_section(f":no_entry_sign: <@{user}> asked to cancel {build_title(pipeline, build)}.")


def rebuild_started(user: str, build: Build, original: tuple[str, int]) -> Rendered:
    pipeline, number = original
    return one_section(
        f":repeat: <@{user}> rebuilt #{number}: {build_title(pipeline, build)} is starting."
    )


def nothing_to_unblock(pipeline: str, build: Build) -> str:
    return f"{build_title(pipeline, build)} is not waiting on a block step."


def unblock_choices(
    pipeline: str, build: Build, steps: Sequence[tuple[UnblockButtonValue, str]]
) -> Rendered:
    """The Unblock button of each waiting step: its form opens on a click."""
    what = "a step that asks for input" if len(steps) == 1 else f"{len(steps)} block steps"
    text = f"{build_title(pipeline, build)} waits on {what}: click to unblock."
    buttons = [
        ButtonElement(
            text=clip(f"Unblock: {label}", 75),
            action_id=ActionId.UNBLOCK,
            value=value.model_dump_json(),
            style="primary",
        )
        for value, label in steps[:25]
    ]
    blocks: list[dict[str, Any]] = [section(text), ActionsBlock(elements=buttons).to_dict()]
    return Rendered(text=text, blocks=blocks)


NO_BUILD_LINK = (
    "That message links no build of this organisation's: *Follow this build* needs a link like "
    "`https://buildkite.com/<org>/<pipeline>/builds/<number>`."
)


def already_followed(pipeline: str, build: Build) -> str:
    return f"I already follow {build_title(pipeline, build)} in this channel."


def following(pipeline: str, build: Build) -> str:
    return f":eyes: Following {build_title(pipeline, build)} in that message's thread."
