"""Slack listeners for /deploy, /cancel, /rebuild and the buttons on build messages.

Each listener acknowledges first (before any Buildkite call), then parses, calls one operation
and answers the person. Failures raise `UserError`, which the app's error handler turns into an
ephemeral message.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond

from app.commands import (
    CANCEL_USAGE,
    DEPLOY_USAGE,
    REBUILD_USAGE,
    BuildRef,
    HelpRequest,
    UsageError,
    parse_build_ref,
    parse_deploy,
)
from app.messages import ActionId, BuildButtonValue, link
from app.operations import Operations, Services, UserError, request_id_for
from handlers.errors import answer_errors

COMMANDS = ("/deploy", "/cancel", "/rebuild")


def register(app: AsyncApp) -> None:
    app.command("/deploy")(answer_errors(deploy_command))
    app.command("/cancel")(answer_errors(cancel_command))
    app.command("/rebuild")(answer_errors(rebuild_command))
    app.action(ActionId.CANCEL.value)(answer_errors(cancel_button))
    app.action(ActionId.REBUILD.value)(answer_errors(rebuild_button))
    app.action(ActionId.OPEN.value)(open_button)


async def _ephemeral(respond: AsyncRespond, text: str) -> None:
    await respond(text=text, response_type="ephemeral", replace_original=False)


async def deploy_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    try:
        request = parse_deploy(command.get("text", ""))
    except UsageError as exc:
        await ack(text=f"{exc}\n\n{DEPLOY_USAGE}")
        return
    if isinstance(request, HelpRequest):
        await ack(text=DEPLOY_USAGE)
        return
    await ack(text=f":hourglass_flowing_sand: Starting a build of `{request.pipeline}`…")
    await Operations(services).deploy(
        request,
        user_id=command["user_id"],
        user_name=command.get("user_name", command["user_id"]),
        channel=command["channel_id"],
        trigger=command.get("trigger_id") or repr(sorted(command.items())),
    )


async def _build_ref_command(
    ack: AsyncAck, command: dict[str, Any], services: Services, usage: str
) -> BuildRef | None:
    try:
        ref = parse_build_ref(
            command.get("text", ""), org=services.settings.buildkite_org, usage=usage
        )
    except UsageError as exc:
        await ack(text=str(exc) if usage in str(exc) else f"{exc}\n\n{usage}")
        return None
    if isinstance(ref, HelpRequest):
        await ack(text=usage)
        return None
    return ref


async def cancel_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    ref = await _build_ref_command(ack, command, services, CANCEL_USAGE)
    if ref is None:
        return
    await ack(text=f":hourglass_flowing_sand: Canceling `{ref.pipeline}` #{ref.number}…")
    key = request_id_for("cancel", command.get("trigger_id", ""))
    build = await Operations(services).cancel(ref, user_id=command["user_id"], dedup_key=key)
    title = link(build.web_url, f"{ref.pipeline} #{ref.number}")
    await _ephemeral(respond, f":no_entry_sign: Cancel requested for {title}.")


async def rebuild_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    ref = await _build_ref_command(ack, command, services, REBUILD_USAGE)
    if ref is None:
        return
    await ack(text=f":hourglass_flowing_sand: Rebuilding `{ref.pipeline}` #{ref.number}…")
    key = request_id_for("rebuild", command.get("trigger_id", ""))
    await Operations(services).rebuild(
        ref, user_id=command["user_id"], channel=command["channel_id"], dedup_key=key
    )


def _button_ref(body: dict[str, Any]) -> BuildRef:
    try:
        value = BuildButtonValue.model_validate_json(body["actions"][0].get("value") or "")
    except (ValidationError, KeyError, IndexError):
        raise UserError("This button's data is not valid any more; nothing was done.") from None
    return BuildRef(value.pipeline, value.number)


async def cancel_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    ref = _button_ref(body)
    user = body["user"]["id"]
    key = f"button:{ActionId.CANCEL}:{ref.pipeline}:{ref.number}"
    build = await Operations(services).cancel(ref, user_id=user, dedup_key=key)
    title = link(build.web_url, f"{ref.pipeline} #{ref.number}")
    await _ephemeral(respond, f":no_entry_sign: Cancel requested for {title}.")


async def rebuild_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    ref = _button_ref(body)
    user = body["user"]["id"]
    channel = (body.get("channel") or {}).get("id") or body["container"]["channel_id"]
    key = f"button:{ActionId.REBUILD}:{ref.pipeline}:{ref.number}"
    build = await Operations(services).rebuild(ref, user_id=user, channel=channel, dedup_key=key)
    title = link(build.web_url, f"{ref.pipeline} #{build.number}")
    await _ephemeral(respond, f":repeat: Rebuild started: {title}. Follow it in the thread.")


async def open_button(ack: AsyncAck) -> None:
    # A link button still sends an action; Slack needs it acknowledged.
    await ack()
