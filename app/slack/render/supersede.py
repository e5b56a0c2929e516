"""What people read about a blocked build superseded by a newer one of its branch: the note
that takes its Unblock button's place, the refusal, and the bot's cancel."""

from __future__ import annotations

from typing import Any

from slack_sdk.models.blocks import ButtonElement, ConfirmObject, ContextBlock, MarkdownTextObject

from app.slack.ids import ActionId
from app.slack.mrkdwn import code, escape, link
from app.slack.payloads import UnblockButtonValue
from app.slack.render.common import clip
from app.storage.records import SupersededBy

_MODES = {
    "refuse": "unblocking this one is refused.",
    "warn": "unblock this one only to deploy the older commit on purpose.",
    "cancel": "the bot cancels this one.",
}


def newer(by: SupersededBy) -> str:
    return link(by.url, f"#{by.number}")


def superseded_note(by: SupersededBy) -> dict[str, Any]:
    """The note shown where the Unblock button was."""
    text = (
        f":fast_forward: Superseded by {newer(by)}, a newer build of this branch that went "
        f"further: {_MODES.get(by.mode, _MODES['refuse'])}"
    )
    return ContextBlock(elements=[MarkdownTextObject(text=text)]).to_dict()


def superseded_unblock(
    pipeline: str, number: int, job_id: str, label: str, by: SupersededBy
) -> list[ButtonElement]:
    """With `superseded: warn`, an "Unblock anyway" that Slack asks to confirm; else nothing."""
    if by.mode != "warn":
        return []
    value = UnblockButtonValue(pipeline=pipeline, number=number, job=job_id, superseded_ok=True)
    return [
        ButtonElement(
            text=clip(f"Unblock anyway: {label}", 75),
            action_id=ActionId.UNBLOCK,
            value=value.model_dump_json(),
            confirm=ConfirmObject(
                title="Unblock a superseded build?",
                text=clip(
                    f"{escape(pipeline)} #{number} is superseded by #{by.number}, a newer build "
                    "of its branch. Unblocking it deploys the older commit.",
                    300,
                ),
                confirm="Unblock anyway",
                deny="Leave it",
            ),
        )
    ]


def superseded_refused(pipeline: str, number: int, by: SupersededBy) -> str:
    return (
        f":fast_forward: {code(pipeline)} #{number} is superseded by {newer(by)}, a newer build "
        "of the same branch that passed or was unblocked: unblocking the older one would deploy "
        "an older commit after it, so it is refused. Use the newer build."
    )


def superseded_confirm_first(pipeline: str, number: int, by: SupersededBy) -> str:
    return (
        f":fast_forward: {code(pipeline)} #{number} is superseded by {newer(by)}. To unblock it "
        "all the same, use the *Unblock anyway* button on its message, which asks you to confirm."
    )


def superseded_canceled(number: int, by: SupersededBy) -> str:
    return (
        f":fast_forward: Canceled by the bot: #{number} was waiting on a block step and is "
        f"superseded by {newer(by)}, a newer build of the same branch."
    )


def superseded_not_canceled(number: int, by: SupersededBy) -> str:
    return (
        f":fast_forward: #{number} is superseded by {newer(by)}, a newer build of the same "
        "branch, but Buildkite cancels only a build that still runs: waiting on its block step "
        "with nothing else to run, it counts as finished. It stays, and unblocking it is refused."
    )


def superseded_cancel_failed(number: int, by: SupersededBy, why: str) -> str:
    """`why` is the core's explanation of Buildkite's error (already mrkdwn)."""
    return (
        f":fast_forward: #{number} is superseded by {newer(by)}, a newer build of the same "
        f"branch, and the bot could not cancel it: {why} It stays, and unblocking it is refused."
    )
