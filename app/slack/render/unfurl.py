"""A build as a card: the status answer in a build's thread, and the unfurl of a pasted build
link (state, branch, commit, who, duration, and the buttons the policy allows)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from app.slack.ids import ActionId, BlockId
from app.slack.mrkdwn import code, escape, plain, trusted_url
from app.slack.payloads import BuildButtonValue
from app.slack.render.common import (
    FIELD_TEXT_LIMIT,
    SECTION_TEXT_LIMIT,
    Rendered,
    build_title,
    clip,
    duration,
    short_commit,
    state_key,
    state_label,
    state_text,
)
from buildkite.models import Build, BuildState

#: The buttons a card may carry, each shown only when the build is in a state it applies to.
CARD_ACTIONS = (ActionId.CANCEL, ActionId.REBUILD, ActionId.RETRY_FAILED)


def author(build: Build) -> str:
    """Who made the build, as Buildkite names them (escaped), or "Buildkite"."""
    person = build.author or build.creator
    return escape(clip(person.name, 80)) if person and person.name else "Buildkite"


def card_buttons(pipeline: str, build: Build, allowed: Collection[ActionId]) -> list[ButtonElement]:
    """The buttons of `allowed` that apply to the build's state, and a link to it."""
    value = BuildButtonValue(pipeline=pipeline, number=build.number).model_dump_json()
    buttons = []
    running = not build.is_final and build.state is not BuildState.CANCELING
    if ActionId.CANCEL in allowed and running:
        buttons.append(
            ButtonElement(
                text="Cancel",
                action_id=ActionId.CANCEL,
                value=value,
                style="danger",
                confirm=ConfirmObject(
                    title="Cancel this build?",
                    text=f"Cancel {escape(pipeline)} #{build.number}?",
                    confirm="Cancel build",
                    deny="Keep it running",
                ),
            )
        )
    if ActionId.REBUILD in allowed and build.is_final:
        buttons.append(ButtonElement(text="Rebuild", action_id=ActionId.REBUILD, value=value))
    if ActionId.RETRY_FAILED in allowed and build.state is BuildState.FAILED:
        buttons.append(
            ButtonElement(text="Retry failed jobs", action_id=ActionId.RETRY_FAILED, value=value)
        )
    web_url = trusted_url(build.web_url)
    if web_url:
        buttons.append(
            ButtonElement(text="Open in Buildkite", action_id=ActionId.OPEN, url=web_url)
        )
    return buttons


def card_blocks(
    pipeline: str, build: Build, *, buttons: Collection[ActionId]
) -> list[dict[str, Any]]:
    """The card's blocks: a section with the build's fields, its message, and its buttons."""
    fields = [
        f"*State*\n{state_text(build)}",
        f"*Branch*\n{code(clip(build.branch or '?', 200))}",
        f"*Commit*\n{code(short_commit(build.commit))}",
        f"*By*\n{author(build)}",
    ]
    took = duration(build)
    if took:
        fields.append(f"*Duration*\n{took}")
    blocks: list[dict[str, Any]] = [
        SectionBlock(
            text=MarkdownTextObject(text=f"*{build_title(pipeline, build)}*"),
            fields=[MarkdownTextObject(text=clip(f, FIELD_TEXT_LIMIT)) for f in fields],
        ).to_dict()
    ]
    if build.message:
        blocks.append(
            ContextBlock(
                elements=[MarkdownTextObject(text=clip(plain(build.message), SECTION_TEXT_LIMIT))]
            ).to_dict()
        )
    elements = card_buttons(pipeline, build, buttons)
    if elements:
        blocks.append(ActionsBlock(block_id=BlockId.BUILD_ACTIONS, elements=elements).to_dict())
    return blocks


def build_card(pipeline: str, build: Build, *, buttons: Collection[ActionId]) -> Rendered:
    text = f"{escape(pipeline)} #{build.number}: {state_label(state_key(build))}"
    return Rendered(text=text, blocks=card_blocks(pipeline, build, buttons=buttons))


def unfurl(pipeline: str, build: Build, *, buttons: Collection[ActionId]) -> dict[str, Any]:
    """One entry of chat.unfurl's `unfurls` map: the card's blocks."""
    return {"blocks": card_blocks(pipeline, build, buttons=buttons)}
