"""Slack listeners for /buildkite (pipelines, builds, agents, whoami, health), its "More",
Stop and Delete buttons, and the pipeline forms.

Each listener acknowledges first, parses, calls one `Admin` method and renders the answer,
ephemerally; pipeline changes are also announced in the channel.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from app.core.admin import Admin
from app.core.commands import (
    AdminRequest,
    AgentsQuery,
    BuildRef,
    BuildsQuery,
    FormErrors,
    HealthRequest,
    HelpRequest,
    PipelineDelete,
    PipelineForm,
    PipelineSpec,
    PipelinesQuery,
    PipelineUpdate,
    UsageError,
    WhoamiRequest,
    builds_query,
    parse_admin,
    parse_pipeline_form,
    usage,
)
from app.core.errors import UserError
from app.core.services import Services, request_id_for
from app.ops.logs import current_correlation_id
from app.slack.actor import Actor
from app.slack.ids import ActionId, CallbackId
from app.slack.payloads import (
    STALE_BUTTON,
    AgentButtonValue,
    AgentsPageValue,
    BuildsPageValue,
    PipelineButtonValue,
    PipelineModalMetadata,
    PipelinesPageValue,
    action_value,
    view_metadata,
)
from app.slack.render import answers
from app.slack.render.admin import (
    agents_list,
    builds_list,
    confirm_pipeline_delete,
    pipeline_modal,
    pipelines_list,
    whoami_message,
)
from app.slack.render.builds import build_details
from app.slack.render.common import Rendered, modal_notice
from app.slack.render.digest import health_digest
from handlers.common import listen

log = logging.getLogger(__name__)

COMMANDS = ("/buildkite",)


def register(app: AsyncApp) -> None:
    listen(
        app,
        commands={"/buildkite": buildkite_command},
        actions={
            ActionId.PIPELINES_MORE.value: more_button,
            ActionId.BUILDS_MORE.value: more_button,
            ActionId.AGENTS_MORE.value: more_button,
            ActionId.AGENT_STOP.value: agent_stop,
            ActionId.AGENT_FORCE_STOP.value: agent_stop,
            ActionId.PIPELINE_DELETE.value: pipeline_delete,
        },
        views={
            CallbackId.PIPELINE_CREATE: pipeline_form_submitted,
            CallbackId.PIPELINE_UPDATE: pipeline_form_submitted,
        },
    )


async def _show(respond: AsyncRespond, rendered: Rendered, *, replace: bool = False) -> None:
    await respond(
        text=rendered.text,
        blocks=rendered.blocks,
        response_type="ephemeral",
        replace_original=replace,
    )


async def _say(respond: AsyncRespond, text: str, *, replace: bool = False) -> None:
    await respond(text=text, response_type="ephemeral", replace_original=replace)


# -- /buildkite ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Asked:
    """One /buildkite command: who asked, from where, and how to answer."""

    op: Admin
    actor: Actor
    trigger_id: str
    respond: AsyncRespond
    client: AsyncWebClient


async def buildkite_command(
    ack: AsyncAck,
    command: dict[str, Any],
    respond: AsyncRespond,
    client: AsyncWebClient,
    services: Services,
) -> None:
    templates = services.settings.pipeline_templates
    try:
        request = parse_admin(
            command.get("text", ""), org=services.settings.buildkite_org, templates=templates
        )
    except UsageError as exc:
        await ack(text=answers.with_usage(exc, usage(templates)))
        return
    if isinstance(request, HelpRequest):
        await ack(text=usage(templates))
        return
    await ack(text=_working(request))
    actor = Actor.from_command(command)
    trigger = str(command.get("trigger_id") or uuid.uuid4().hex)
    asked = _Asked(Admin(services), actor, trigger, respond, client)
    await _ANSWERS[type(request)](request, asked)


async def _pipelines(request: PipelinesQuery, asked: _Asked) -> None:
    page = await asked.op.pipelines_page(request)
    await _show(asked.respond, pipelines_list(page))


async def _builds(request: BuildsQuery, asked: _Asked) -> None:
    page = await asked.op.builds_page(request)
    await _show(asked.respond, builds_list(page))


async def _build(request: BuildRef, asked: _Asked) -> None:
    build = await asked.op.build(request)
    await _show(asked.respond, build_details(request.pipeline, build))


async def _agents(request: AgentsQuery, asked: _Asked) -> None:
    page = await asked.op.agents_page(request)
    await _show(asked.respond, agents_list(page))


async def _whoami(request: WhoamiRequest, asked: _Asked) -> None:
    await _show(asked.respond, whoami_message(await asked.op.whoami()))


async def _health(request: HealthRequest, asked: _Asked) -> None:
    await _show(asked.respond, health_digest(await asked.op.health(request)))


async def _create(spec: PipelineSpec, asked: _Asked) -> None:
    request_id = request_id_for("pipeline create", asked.trigger_id)
    pipeline, told = await asked.op.create_pipeline(spec, asked.actor, request_id=request_id)
    if not told:  # the channel post failed (a private channel without the bot, say)
        text = answers.pipeline_not_announced("Created", pipeline.web_url, pipeline.slug)
        await _say(asked.respond, text)


async def _form(request: PipelineForm, asked: _Asked) -> None:
    await asked.op.require_admin(
        asked.actor, "create pipelines", action="pipeline create", pipeline=request.name or ""
    )
    templates = asked.op.s.settings.pipeline_templates
    view = pipeline_modal(
        PipelineModalMetadata(channel=asked.actor.channel_id),
        name=request.name,
        repository=request.repository,
        steps=templates.get("default"),
    )
    await asked.client.views_open(trigger_id=asked.trigger_id, view=view)


async def _update(request: PipelineUpdate, asked: _Asked) -> None:
    if not request.fields:
        pipeline = await asked.op.pipeline_for_update(request.pipeline, asked.actor)
        view = pipeline_modal(
            PipelineModalMetadata(channel=asked.actor.channel_id, pipeline=pipeline.slug),
            repository=pipeline.repository,
            default_branch=pipeline.default_branch,
            description=pipeline.description,
        )
        await asked.client.views_open(trigger_id=asked.trigger_id, view=view)
        return
    pipeline, told = await asked.op.update_pipeline(request.pipeline, request.fields, asked.actor)
    if not told:
        text = answers.pipeline_not_announced("Updated", pipeline.web_url, pipeline.slug)
        await _say(asked.respond, text)


async def _delete(request: PipelineDelete, asked: _Asked) -> None:
    pipeline = await asked.op.pipeline_to_delete(request.pipeline, asked.actor)
    rendered = confirm_pipeline_delete(pipeline.slug, pipeline.name, pipeline.web_url)
    await _show(asked.respond, rendered)


def _working(request: AdminRequest) -> str:
    """What the person sees at once, for the requests that take a while."""
    if isinstance(request, HealthRequest):
        return answers.READING_BUILDS
    if isinstance(request, PipelineSpec):
        return answers.CREATING_PIPELINE
    if isinstance(request, PipelineUpdate) and request.fields:
        return answers.UPDATING_PIPELINE
    return ""


_ANSWERS: dict[type[AdminRequest], Callable[[Any, _Asked], Awaitable[None]]] = {
    PipelinesQuery: _pipelines,
    BuildsQuery: _builds,
    BuildRef: _build,
    AgentsQuery: _agents,
    WhoamiRequest: _whoami,
    HealthRequest: _health,
    PipelineSpec: _create,
    PipelineForm: _form,
    PipelineUpdate: _update,
    PipelineDelete: _delete,
}


# -- buttons ------------------------------------------------------------------------------------


async def more_button(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    """ "More" under a list of pipelines, builds or agents: the list's next page, in its place."""
    await ack()
    op, action_id = Admin(services), body["actions"][0].get("action_id")
    if action_id == ActionId.PIPELINES_MORE.value:
        pipelines = action_value(body, PipelinesPageValue)
        page = await op.pipelines_page(PipelinesQuery(pipelines.filter, pipelines.page))
        rendered = pipelines_list(page)
    elif action_id == ActionId.AGENTS_MORE.value:
        agents = action_value(body, AgentsPageValue)
        rendered = agents_list(await op.agents_page(AgentsQuery(agents.queue, agents.page)))
    else:
        builds = action_value(body, BuildsPageValue)
        try:
            query = builds_query(builds.pipeline, builds.state, builds.branch, builds.page)
        except UsageError:
            raise UserError(STALE_BUTTON) from None
        rendered = builds_list(await op.builds_page(query))
    await _show(respond, rendered, replace=True)


async def agent_stop(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    """Stop and Force stop: the agent stops after its job, or at once, canceling the job."""
    await ack()
    agent = action_value(body, AgentButtonValue)
    force = body["actions"][0].get("action_id") == ActionId.AGENT_FORCE_STOP.value
    await Admin(services).stop_agent(agent, Actor.from_button(body), force=force)
    await _say(respond, answers.agent_stopping(agent.name, force=force))


async def pipeline_delete(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    value = action_value(body, PipelineButtonValue)
    told = await Admin(services).delete_pipeline(value.pipeline, Actor.from_button(body))
    await _say(respond, answers.pipeline_deleted(value.pipeline, announced=told), replace=True)


# -- the pipeline forms ---------------------------------------------------------------------------


async def pipeline_form_submitted(
    ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient, services: Services
) -> None:
    """Check the form (mistakes show under their fields), then create or update the pipeline
    and show the outcome in the modal; a refusal from Buildkite shows the form again."""
    view = body["view"]
    metadata = view_metadata(view, PipelineModalMetadata)
    if metadata is None:
        await ack(
            response_action="update", view=modal_notice(answers.PIPELINE_TITLE, answers.STALE_FORM)
        )
        return
    values = (view.get("state") or {}).get("values") or {}
    try:
        form = parse_pipeline_form(values, updating=metadata.pipeline is not None)
    except FormErrors as exc:
        await ack(response_action="errors", errors=exc.errors)
        return
    title = answers.pipeline_form_title(updating=metadata.pipeline is not None)
    await ack(response_action="update", view=modal_notice(title, answers.WORKING))
    actor = Actor.from_user(body["user"], metadata.channel)
    outcome = await _save_pipeline(Admin(services), form, metadata, actor, view)
    try:
        await client.views_update(view_id=view["id"], view=outcome)
    except SlackApiError as exc:  # the modal was closed; the channel post says what happened
        log.info("could not show the outcome in the modal: %s", exc.response.get("error"))


async def _save_pipeline(
    op: Admin,
    form: PipelineSpec | dict[str, str],
    metadata: PipelineModalMetadata,
    actor: Actor,
    view: dict[str, Any],
) -> dict[str, Any]:
    """Create or update the pipeline from the form: the modal that tells how it went."""
    title = answers.pipeline_form_title(updating=metadata.pipeline is not None)
    try:
        if isinstance(form, PipelineSpec):
            request_id = request_id_for("pipeline create", view["id"], view.get("hash") or "")
            pipeline, _ = await op.create_pipeline(form, actor, request_id=request_id)
            verb = "Created"
        else:
            assert metadata.pipeline is not None
            pipeline, _ = await op.update_pipeline(metadata.pipeline, form, actor)
            verb = "Updated"
        outcome = modal_notice(title, answers.pipeline_saved(verb, pipeline.web_url, pipeline.slug))
    except UserError as exc:
        fields = (
            {
                "name": form.name,
                "repository": form.repository,
                "default_branch": form.default_branch,
                "description": form.description,
                "steps": form.steps,
            }
            if isinstance(form, PipelineSpec)
            else dict(form)
        )
        outcome = pipeline_modal(metadata, error=exc.text, **fields)
    except Exception:
        ref = current_correlation_id() or uuid.uuid4().hex[:8]
        log.exception("pipeline form failed (ref %s)", ref)
        outcome = modal_notice(title, answers.bot_failed_in_modal(ref))
    return outcome
