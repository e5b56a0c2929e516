"""Slack listeners for /deploy (and its lock, unlock, locks, audit), /cancel, /rebuild, and the
buttons on build, confirmation and approval messages.

Each listener acknowledges first (before any Buildkite call), then parses, calls one operation
and answers the person. Failures raise `UserError`; the error wrapper (applied once, by
`handlers.common.listen`) turns it into an ephemeral message.
"""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond

from app.core.approvals import Approvals
from app.core.build_actions import BuildActions
from app.core.commands import (
    CANCEL_USAGE,
    DEPLOY_USAGE,
    REBUILD_USAGE,
    AuditRequest,
    BuildRef,
    DeployRequest,
    FreezesRequest,
    HelpRequest,
    LockRequest,
    LocksRequest,
    UnlockRequest,
    UsageError,
    parse_build_ref,
    parse_deploy,
)
from app.core.commands.releases import RELEASE_USAGE
from app.core.deploys import AwaitingApproval, Deploys, NeedsConfirmation, Started
from app.core.freezes import freezes_listing
from app.core.locks import Locks
from app.core.services import Services, request_id_for
from app.slack.actor import Actor
from app.slack.ids import ActionId
from app.slack.payloads import BuildButtonValue, RequestButtonValue, action_value
from app.slack.render import answers
from app.slack.render.deploys import audit_list, locks_list
from app.storage.keys import REQUEST_TTL
from handlers.common import ephemeral, in_deploy_queue, listen
from handlers.releases import release_command

COMMANDS = ("/deploy", "/cancel", "/rebuild")


def register(app: AsyncApp) -> None:
    listen(
        app,
        commands={"/deploy": deploy_command, "/cancel": build_command, "/rebuild": build_command},
        actions={
            ActionId.CANCEL.value: cancel_button,
            ActionId.REBUILD.value: rebuild_button,
            ActionId.OPEN.value: open_button,
            ActionId.CONFIRM_DEPLOY.value: confirm_button,
            ActionId.ABORT_DEPLOY.value: abort_button,
            ActionId.APPROVE.value: approve_button,
            ActionId.REJECT.value: reject_button,
        },
    )


def _trigger(command: dict[str, Any]) -> str:
    # Slack always sends a trigger_id; without one, the whole request identifies the request.
    return str(command.get("trigger_id") or repr(sorted(command.items())))


async def deploy_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    """/deploy: acknowledged with the deploy's place in line before anything else is done."""
    if await release_command(ack, command, respond, services):
        return
    try:
        request = parse_deploy(command.get("text", ""))
    except UsageError as exc:
        await ack(text=answers.with_usage(exc, DEPLOY_USAGE))
        return
    if isinstance(request, HelpRequest):
        await ack(text=f"{DEPLOY_USAGE}\n*Releases:*\n{RELEASE_USAGE}")
        return
    if not isinstance(request, DeployRequest):
        await ack()
        await _deploy_subcommand(request, command, respond, services)
        return
    outcome = await in_deploy_queue(
        services,
        ack,
        respond,
        request.pipeline,
        lambda position: answers.starting(request.pipeline, position),
        lambda: Deploys(services).deploy(
            request, Actor.from_command(command), trigger=_trigger(command)
        ),
    )
    if isinstance(outcome, NeedsConfirmation):
        await ephemeral(respond, outcome.rendered.text, blocks=outcome.rendered.blocks)
    elif isinstance(outcome, Started):
        build = outcome.build
        await ephemeral(respond, answers.started(build.web_url, request.pipeline, build.number))
    elif isinstance(outcome, AwaitingApproval):  # a break-glass deploy, straight to approval
        await ephemeral(respond, answers.APPROVAL_REQUESTED)


async def _deploy_subcommand(
    request: LocksRequest | AuditRequest | LockRequest | UnlockRequest | FreezesRequest,
    command: dict[str, Any],
    respond: AsyncRespond,
    services: Services,
) -> None:
    """/deploy locks, audit, lock, unlock and freezes (already acknowledged)."""
    ops, actor = Locks(services), Actor.from_command(command)
    if isinstance(request, FreezesRequest):
        await ephemeral(
            respond, freezes_listing(services.policy.data.freezes, services.tuning.clock())
        )
    elif isinstance(request, LocksRequest):
        await ephemeral(respond, locks_list(await services.store.pipeline_locks()))
    elif isinstance(request, AuditRequest):
        entries = await ops.audit_entries(request, actor)
        await ephemeral(respond, audit_list(entries, request.pipeline))
    else:
        text = await (
            ops.lock(request, actor)
            if isinstance(request, LockRequest)
            else ops.unlock(request, actor)
        )
        await respond(text=text, response_type="in_channel", replace_original=False)


async def _build_ref_command(
    ack: AsyncAck, command: dict[str, Any], services: Services, usage: str
) -> BuildRef | None:
    try:
        ref = parse_build_ref(
            command.get("text", ""), org=services.settings.buildkite_org, usage=usage
        )
    except UsageError as exc:
        await ack(text=str(exc) if usage in str(exc) else answers.with_usage(exc, usage))
        return None
    if isinstance(ref, HelpRequest):
        await ack(text=usage)
        return None
    return ref


async def build_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    """/cancel and /rebuild: acknowledged at once, then the build named is canceled or rebuilt."""
    canceling = command.get("command") == "/cancel"
    usage = CANCEL_USAGE if canceling else REBUILD_USAGE
    ref = await _build_ref_command(ack, command, services, usage)
    if ref is None:
        return
    if canceling:
        await ack(text=answers.canceling(ref.pipeline, ref.number))
    elif services.policy.rule_for(ref.pipeline).asks_first:
        await ack(text=answers.showing_protected(ref.pipeline, ref.number))
    else:
        await ack(text=answers.rebuilding(ref.pipeline, ref.number))
    # The key is this one request's, so it is kept as long as a request's: a replay of the
    # same signed command (good for five minutes) is answered "You already asked".
    key = request_id_for("cancel" if canceling else "rebuild", _trigger(command))
    ops, actor = BuildActions(services), Actor.from_command(command)
    if canceling:
        build = await ops.cancel(ref, actor, dedup_key=key, dedup_ttl=REQUEST_TTL)
        await ephemeral(respond, answers.cancel_requested(build.web_url, ref.pipeline, ref.number))
        return
    outcome = await ops.rebuild(
        ref, actor, dedup_key=key, trigger=_trigger(command), dedup_ttl=REQUEST_TTL
    )
    if isinstance(outcome, NeedsConfirmation):
        await ephemeral(respond, outcome.rendered.text, blocks=outcome.rendered.blocks)
        return
    build = outcome.build
    await ephemeral(respond, answers.started(build.web_url, ref.pipeline, build.number))


def _button_ref(body: dict[str, Any]) -> BuildRef:
    value = action_value(body, BuildButtonValue)
    return BuildRef(value.pipeline, value.number)


def _request_id(body: dict[str, Any]) -> str:
    return action_value(body, RequestButtonValue).id


async def cancel_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    ref = _button_ref(body)
    key = f"button:{ActionId.CANCEL}:{ref.pipeline}:{ref.number}"
    build = await BuildActions(services).cancel(ref, Actor.from_button(body), dedup_key=key)
    await ephemeral(respond, answers.cancel_requested(build.web_url, ref.pipeline, ref.number))


async def rebuild_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    ref = _button_ref(body)
    key = f"button:{ActionId.REBUILD}:{ref.pipeline}:{ref.number}"
    action = body["actions"][0]
    # One click, one request: a later click on the same button asks again.
    trigger = f"{body.get('trigger_id')}:{action.get('action_ts')}:{body['user']['id']}"
    outcome = await BuildActions(services).rebuild(
        ref, Actor.from_button(body), dedup_key=key, trigger=trigger
    )
    if isinstance(outcome, NeedsConfirmation):
        await ephemeral(respond, outcome.rendered.text, blocks=outcome.rendered.blocks)
        return
    build = outcome.build
    await ephemeral(respond, answers.rebuild_started(build.web_url, ref.pipeline, build.number))


async def open_button(ack: AsyncAck) -> None:
    # A link button still sends an action; Slack needs it acknowledged.
    await ack()


async def confirm_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    outcome = await Deploys(services).confirm(_request_id(body), Actor.from_button(body))
    if isinstance(outcome, Started):
        build = outcome.build
        text = answers.started(build.web_url, build.pipeline_slug, build.number)
        await respond(text=text, replace_original=True)
    elif isinstance(outcome, AwaitingApproval):
        await respond(text=answers.APPROVAL_REQUESTED, replace_original=True)


async def abort_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    await Deploys(services).abort(_request_id(body), Actor.from_button(body))
    await respond(text=answers.DEPLOY_ABORTED, replace_original=True)


async def approve_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    build = await Approvals(services).decide(
        _request_id(body), Actor.from_button(body), approve=True
    )
    if build is not None:
        text = answers.approved(build.web_url, build.pipeline_slug, build.number)
        await ephemeral(respond, text)


async def reject_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    await Approvals(services).decide(_request_id(body), Actor.from_button(body), approve=False)
    await ephemeral(respond, answers.REJECTED)
