"""The unblock modals: one built from a block step's fields, and the free-form one for a step
whose fields the bot does not know."""

from __future__ import annotations

from typing import Any

from slack_sdk.models.blocks import (
    Block,
    ContextBlock,
    InputBlock,
    InputInteractiveElement,
    MarkdownTextObject,
    PlainTextInputElement,
    SectionBlock,
    StaticMultiSelectElement,
    StaticSelectElement,
)
from slack_sdk.models.blocks import Option as SlackOption
from slack_sdk.models.views import View

from app.core.unblock_forms import BlockForm, FormField, Option
from app.slack.ids import INPUT_ACTION, BlockId, CallbackId, field_block_id
from app.slack.mrkdwn import escape, link
from app.slack.payloads import UnblockMetadata
from app.slack.render.common import clip


def _option(option: Option) -> SlackOption:
    return SlackOption(value=option.value, label=clip(option.label, 75))


def _field_element(spec: FormField) -> InputInteractiveElement:
    if spec.kind != "select":
        if not spec.default:
            return PlainTextInputElement(action_id=INPUT_ACTION)
        default = spec.default[0]
        return PlainTextInputElement(
            action_id=INPUT_ACTION, initial_value=clip(default, 3000), multiline="\n" in default
        )
    options = [_option(o) for o in spec.options]
    initial = [_option(o) for o in spec.initial_options]
    if spec.multiple:
        return StaticMultiSelectElement(
            action_id=INPUT_ACTION, options=options, initial_options=initial or None
        )
    return StaticSelectElement(
        action_id=INPUT_ACTION, options=options, initial_option=initial[0] if initial else None
    )


def _field_input(spec: FormField) -> InputBlock:
    return InputBlock(
        block_id=field_block_id(spec.key),
        label=clip(spec.label, 2000),
        element=_field_element(spec),
        optional=not spec.required,
        hint=clip(spec.hint, 2000) if spec.hint else None,
    )


def _modal(metadata: UnblockMetadata, blocks: list[Block]) -> dict[str, Any]:
    view = View(
        type="modal",
        callback_id=CallbackId.UNBLOCK,
        title="Unblock",
        submit="Unblock",
        close="Cancel",
        private_metadata=metadata.model_dump_json(exclude_none=True),
        blocks=blocks,
    )
    return view.to_dict()


def unblock_modal(label: str, form: BlockForm, metadata: UnblockMetadata) -> dict[str, Any]:
    """A modal built from a block step's fields (text and select, as in Buildkite's YAML)."""
    title = f"*{clip(escape(label), 300)}*"
    if form.prompt:
        title += "\n" + clip(escape(form.prompt), 2500)
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=title)),
        ContextBlock(elements=[MarkdownTextObject(text=f"Fields from {form.source}.")]),
    ]
    blocks += [_field_input(spec) for spec in form.fields]
    return _modal(metadata, blocks)


def unblock_freeform_modal(
    label: str, build_url: str | None, problem: str | None, metadata: UnblockMetadata
) -> dict[str, Any]:
    """The modal for a block step whose fields the bot does not know: `key=value` lines."""
    where = (
        link(build_url, f"{metadata.pipeline} #{metadata.number}")
        if build_url
        else f"`{metadata.pipeline}` #{metadata.number}"
    )
    why = (
        f"The bot does not know this step's fields: {escape(problem)}."
        if problem
        else "The bot does not know this step's fields: Buildkite's API does not return them, "
        "and neither the pipeline's steps nor the policy's `unblock_forms` describe this step "
        "(steps uploaded by an agent live only in the build)."
    )
    text = (
        f"*{clip(escape(label), 300)}*\n{why}\nSee them on {where}, and type them below, "
        "one `key=value` a line, or leave it empty if the step has none."
    )
    blocks: list[Block] = [
        SectionBlock(text=MarkdownTextObject(text=clip(text, 3000))),
        InputBlock(
            block_id=BlockId.UNBLOCK_FREEFORM,
            label="Fields (key=value, one a line)",
            element=PlainTextInputElement(
                action_id=INPUT_ACTION,
                multiline=True,
                placeholder="release-name=Flying Dolphin",
            ),
            optional=True,
            hint="Keys are letters, digits, /, - and _. Give a key twice for several "
            "choices of one select.",
        ),
    ]
    return _modal(metadata, blocks)
