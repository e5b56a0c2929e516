"""Slack listeners for the buttons that act inside a build: Unblock (with its modal) and Retry
failed jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond

from app.core.build_actions import BuildActions
from app.core.commands import BuildRef
from app.core.errors import UserError, explain
from app.core.services import Services
from app.core.unblock_forms import FormError, parse_freeform
from app.slack.actor import Actor
from app.slack.ids import ActionId, BlockId, CallbackId, field_block_id
from app.slack.payloads import (
    BuildButtonValue,
    UnblockButtonValue,
    UnblockMetadata,
    action_value,
    view_metadata,
)
from app.slack.render import answers
from app.slack.render.common import modal_notice, notice
from app.slack.render.unblock import unblock_freeform_modal, unblock_modal
from buildkite.errors import BuildkiteError, ValidationFailed
from handlers.common import ephemeral, listen
from handlers.errors import error_text


def register(app: AsyncApp) -> None:
    listen(
        app,
        actions={ActionId.UNBLOCK.value: unblock_button, ActionId.RETRY_FAILED.value: retry_button},
        views={CallbackId.UNBLOCK: unblock_submit},
    )


def _thread_of(body: dict[str, Any]) -> tuple[str, str | None]:
    """The channel of a click, and the thread its replies belong in (the clicked message's).

    A click in an ephemeral message (a `/buildkite build` answer) has no thread: Slack sends no
    `message` then, and its `container.message_ts` is a message nobody else can see.
    """
    container = body.get("container") or {}
    channel = (body.get("channel") or {}).get("id") or container["channel_id"]
    message = body.get("message")
    if container.get("is_ephemeral") or not isinstance(message, dict):
        return channel, None
    return channel, message.get("thread_ts") or container.get("message_ts")


async def unblock_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    value = action_value(body, UnblockButtonValue)
    actor = Actor.from_button(body)
    ops = BuildActions(services)
    target = await ops.unblock_form(value, actor)
    channel, thread_ts = _thread_of(body)
    if target.form is None or target.form.fields:
        metadata = UnblockMetadata(
            pipeline=value.pipeline,
            number=value.number,
            job=value.job,
            channel=channel,
            thread_ts=thread_ts,
            label=target.label[:200],
            superseded_ok=value.superseded_ok,
        )
        view = (
            unblock_modal(target.label, target.form, metadata)
            if target.form is not None
            else unblock_freeform_modal(target.label, target.build_url, target.problem, metadata)
        )
        await services.outbox.open_view(body["trigger_id"], view)
        return
    key = f"unblock:{value.pipeline}:{value.number}:{value.job}"
    try:
        await ops.unblock(
            value, actor, label=target.label, fields={}, thread=(channel, thread_ts), dedup_key=key
        )
    except BuildkiteError as exc:
        raise UserError(
            explain(exc, action="unblock", pipeline=value.pipeline, number=value.number)
        ) from None
    await ephemeral(respond, answers.unblocked(target.label))


def _submitted_values(view: dict[str, Any]) -> dict[str, str]:
    """The fields to send: one value a field, a multiple select's choices one a line (as
    Buildkite keeps them in the build's meta-data), and the free-form lines parsed.

    Raises FormError for a free-form line that is not `key=value`.
    """
    values: dict[str, str] = {}
    for block_id, actions in (view.get("state") or {}).get("values", {}).items():
        entry = actions.get("value") or {}
        if block_id == BlockId.UNBLOCK_FREEFORM:
            values.update(parse_freeform(str(entry.get("value") or "")))
            continue
        if not block_id.startswith("field:"):
            continue
        if "selected_options" in entry:
            chosen = [str(o.get("value")) for o in entry.get("selected_options") or []]
            value = "\n".join(chosen) or None
        elif entry.get("selected_option"):
            value = entry["selected_option"].get("value")
        else:
            value = entry.get("value")
        if value not in (None, ""):
            values[block_id.removeprefix("field:")] = str(value)
    return values


def _field_errors(exc: ValidationFailed, view: dict[str, Any]) -> dict[str, str]:
    """Buildkite's 422, each problem next to the input of its field (the first input when the
    field is not in the form, or when Buildkite does not say which field)."""
    inputs = _block_ids(view)
    if not inputs:
        return {}
    freeform = BlockId.UNBLOCK_FREEFORM in inputs
    errors: dict[str, list[str]] = {}
    for error in exc.errors:
        field = str(error.get("field") or "")
        code = str(error.get("code") or "invalid")
        what = answers.MISSING_FIELD if code.startswith("missing") else code
        target = field_block_id(field)
        if freeform or target not in inputs:
            target, what = inputs[0], f"`{field}`: {what}" if field else what
        errors.setdefault(target, []).append(what)
    if not errors:  # only a message: put it on the field it names (by key or label), if any
        named = [
            b["block_id"]
            for b in view.get("blocks") or []
            if b.get("type") == "input"
            and str(b.get("block_id")).startswith("field:")
            and any(
                name and name in exc.message
                for name in (
                    str(b["block_id"]).removeprefix("field:"),
                    str((b.get("label") or {}).get("text") or ""),
                )
            )
        ]
        errors[named[0] if named else inputs[0]] = [exc.message]
    return {block: answers.buildkite_says(problems) for block, problems in errors.items()}


async def unblock_submit(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    """The unblock modal was submitted: unblock with its values, or show what is wrong."""
    view = body["view"]
    user = body["user"]["id"]
    meta = view_metadata(view, UnblockMetadata)
    if meta is None:
        # Not a form the bot opened (or one from an older version): say so in the modal.
        notice_view = modal_notice(answers.UNBLOCK_TITLE, answers.STALE_UNBLOCK_FORM)
        await ack(response_action="update", view=notice_view)
        return
    try:
        values = _submitted_values(view)
    except FormError as exc:
        await ack(response_action="errors", errors={BlockId.UNBLOCK_FREEFORM: str(exc)[:150]})
        return
    value = UnblockButtonValue(
        pipeline=meta.pipeline, number=meta.number, job=meta.job, superseded_ok=meta.superseded_ok
    )
    actor = Actor.from_user(body["user"], meta.channel)
    ops = BuildActions(services)
    work = asyncio.ensure_future(
        ops.unblock(
            value,
            actor,
            label=meta.label,
            fields=values,
            thread=(meta.channel, meta.thread_ts),
            dedup_key=f"unblock:{meta.pipeline}:{meta.number}:{meta.job}",
        )
    )
    done, _ = await asyncio.wait({work}, timeout=services.tuning.deploys.submit_wait)
    if not done:
        await ack()  # Buildkite is slow: close the modal, answer when it is done
    try:
        await asyncio.shield(work)
    except Exception as exc:  # every failure gets an answer, in the modal or beside it
        errors, text = _unblock_refusal(exc, view, meta)
        if done:
            await ack(response_action="errors", errors=errors)
        else:
            await services.outbox.ephemeral(meta.channel, user, notice(text))
        return
    if done:
        await ack()


def _unblock_refusal(
    exc: Exception, view: dict[str, Any], meta: UnblockMetadata
) -> tuple[dict[str, str], str]:
    """A failed unblock, told in the modal (errors by input) or beside it (one text)."""
    if isinstance(exc, ValidationFailed):
        return _field_errors(exc, view), answers.unblock_refused(exc.message)
    text = (
        explain(exc, action="unblock", pipeline=meta.pipeline, number=meta.number)
        if isinstance(exc, BuildkiteError)
        else error_text(exc)
    )
    return {next(iter(_block_ids(view)), "field:"): text[:150]}, text


def _block_ids(view: dict[str, Any]) -> list[str]:
    return [b["block_id"] for b in view.get("blocks") or [] if b.get("type") == "input"]


async def retry_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    value = action_value(body, BuildButtonValue)
    ref = BuildRef(value.pipeline, value.number)
    jobs = await BuildActions(services).retry_failed(
        ref,
        Actor.from_button(body),
        thread=_thread_of(body),
        dedup_key=f"button:{ActionId.RETRY_FAILED}:{ref.pipeline}:{ref.number}",
    )
    await ephemeral(respond, answers.retrying((j.web_url, j.display_name) for j in jobs))
