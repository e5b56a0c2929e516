"""Slack listeners' part for the release ledger's /deploy subcommands: status, history,
rollback and promote. `/deploy` hands them over here (see handlers.deploy)."""

from __future__ import annotations

import time
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncRespond

from app.core.commands import UsageError, split_words
from app.core.commands.releases import (
    HistoryRequest,
    PromoteRequest,
    RollbackRequest,
    StatusRequest,
    parse_release,
)
from app.core.deploys import NeedsConfirmation, Started
from app.core.release_actions import ReleaseDeploy, Releases
from app.core.services import Services, request_id_for
from app.slack.actor import Actor
from app.slack.render import answers
from app.slack.render import releases as render
from handlers.common import ephemeral, in_deploy_queue


async def release_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, services: Services
) -> bool:
    """Handle `/deploy status|history|rollback|promote …`; False when the text is none of them."""
    try:
        request = parse_release(split_words(command.get("text", "")))
    except UsageError as exc:
        await ack(text=str(exc))
        return True
    if request is None:
        return False
    if isinstance(request, RollbackRequest | PromoteRequest):
        await _queued(request, ack, command, respond, services)
        return True
    await ack()
    await _run(request, command, respond, services)
    return True


async def _queued(
    request: RollbackRequest | PromoteRequest,
    ack: AsyncAck,
    command: dict[str, Any],
    respond: AsyncRespond,
    services: Services,
) -> None:
    """A rollback or a promotion is a deploy: it waits its turn in /deploy's queue (or is
    refused in its ack when the queue is full), exactly as a typed /deploy does; its place is
    given back before the person is answered."""
    asked = await in_deploy_queue(
        services,
        ack,
        respond,
        request.pipeline,
        lambda position: render.looking_up(request.pipeline, position),
        lambda: _release_deploy(request, command, services),
    )
    if asked is None:
        return
    outcome = asked.outcome
    if isinstance(outcome, NeedsConfirmation):
        await ephemeral(respond, outcome.rendered.text, blocks=outcome.rendered.blocks)
    elif isinstance(outcome, Started):
        build = outcome.build
        if asked.target is not None:
            text = render.rollback_started(
                build.web_url,
                request.pipeline,
                build.number,
                asked.live,
                asked.target,
                asked.diff_url,
            )
        else:
            text = render.promote_started(build.web_url, request.pipeline, build.number, asked.live)
        await ephemeral(respond, text)
    else:
        await ephemeral(respond, answers.APPROVAL_REQUESTED)


async def _release_deploy(
    request: RollbackRequest | PromoteRequest, command: dict[str, Any], services: Services
) -> ReleaseDeploy:
    releases, actor = Releases(services), Actor.from_command(command)
    trigger = str(command.get("trigger_id") or repr(sorted(command.items())))
    if isinstance(request, RollbackRequest):
        return await releases.rollback(request, actor, trigger=request_id_for("rollback", trigger))
    return await releases.promote(request, actor, trigger=request_id_for("promote", trigger))


async def _run(
    request: StatusRequest | HistoryRequest,
    command: dict[str, Any],
    respond: AsyncRespond,
    services: Services,
) -> None:
    releases = Releases(services)
    if isinstance(request, StatusRequest):
        shown = render.status_message(await releases.status(request.pipeline), now=time.time())
        await ephemeral(respond, shown.text, blocks=shown.blocks)
        return
    entries = await releases.history(request)
    shown = render.history_message(request.pipeline, entries, now=time.time())
    await ephemeral(respond, shown.text, blocks=shown.blocks)
