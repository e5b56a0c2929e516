"""The mutations: deploy, cancel, rebuild, retry failed jobs and unblock, each through the
core service the Slack listeners call (policy, locks, claims and audit are theirs)."""

from __future__ import annotations

import unicodedata

from app.agents.arguments import (
    MAX_FIELD_VALUE,
    BuildArgs,
    DeployArgs,
    UnblockArgs,
)
from app.agents.context import Context, Refused
from app.agents.tools.reads import fetch_build
from app.agents.views import (
    MutationResult,
    build_view,
)
from app.core.build_actions import BuildActions
from app.core.commands import BuildRef, DeployRequest
from app.core.deploys import AwaitingApproval, Deploys, NeedsConfirmation, Started
from app.core.services import request_id_for
from app.core.unblock_forms import FIELD_KEY, BlockForm
from app.slack.payloads import UnblockButtonValue
from app.storage.keys import REQUEST_TTL


async def deploy(ctx: Context, args: DeployArgs) -> MutationResult:
    """Start a build; on a protected pipeline, ask a person in Slack to approve it first."""
    channel = ctx.channel_for(args.pipeline)
    actor = ctx.agent.actor(channel)
    deploys = Deploys(ctx.services)
    request = DeployRequest(
        pipeline=args.pipeline,
        branch=args.branch,
        commit=args.commit or "HEAD",
        message=args.message or f"Deployed by agent {ctx.agent.name}",
        env=dict(args.env or {}),
    )
    outcome = await deploys.deploy(request, actor, trigger=ctx.trigger)
    if isinstance(outcome, NeedsConfirmation):
        # An agent confirms nothing for itself: its plan goes to a person for approval.
        outcome = await deploys.confirm(request_id_for("deploy", ctx.trigger), actor)
    return _mutation(ctx, args.pipeline, outcome)


def _mutation(
    ctx: Context, pipeline: str, outcome: Started | NeedsConfirmation | AwaitingApproval
) -> MutationResult:
    if isinstance(outcome, Started):
        view = build_view(pipeline, outcome.build, requested_by=ctx.agent.user_id)
        return MutationResult(status="started", build=view)
    if isinstance(outcome, AwaitingApproval):
        return MutationResult(status="awaiting_approval", request_id=outcome.approval_id)
    raise Refused("The pipeline asks for a confirmation the bot could not turn into a request.")


async def cancel_build(ctx: Context, args: BuildArgs) -> MutationResult:
    """Cancel a running build."""
    actor = ctx.agent.actor(ctx.channel_for(args.pipeline))
    build = await BuildActions(ctx.services).cancel(
        BuildRef(args.pipeline, args.number),
        actor,
        dedup_key=request_id_for("cancel", ctx.trigger),
        dedup_ttl=REQUEST_TTL,
    )
    return MutationResult(status="started", build=build_view(args.pipeline, build))


async def rebuild_build(ctx: Context, args: BuildArgs) -> MutationResult:
    """Rebuild a build; on a protected pipeline, a person approves it first (as a deploy)."""
    channel = ctx.channel_for(args.pipeline)
    actor = ctx.agent.actor(channel)
    actions = BuildActions(ctx.services)
    outcome = await actions.rebuild(
        BuildRef(args.pipeline, args.number),
        actor,
        dedup_key=request_id_for("rebuild-claim", ctx.trigger),
        trigger=ctx.trigger,
        dedup_ttl=REQUEST_TTL,
    )
    if isinstance(outcome, NeedsConfirmation):
        confirmed = await actions.deploys.confirm(request_id_for("rebuild", ctx.trigger), actor)
        return _mutation(ctx, args.pipeline, confirmed)
    return _mutation(ctx, args.pipeline, outcome)


async def retry_failed_jobs(ctx: Context, args: BuildArgs) -> MutationResult:
    """Retry a failed build's failed jobs (the same build, not a new one)."""
    channel = ctx.channel_for(args.pipeline)
    actor = ctx.agent.actor(channel)
    ref = BuildRef(args.pipeline, args.number)
    await BuildActions(ctx.services).retry_failed(
        ref, actor, thread=(channel, None), dedup_key=request_id_for("retry", ctx.trigger)
    )
    build = await fetch_build(ctx, args.pipeline, args.number, fresh=True)
    return MutationResult(status="started", build=build_view(args.pipeline, build))


async def unblock_job(ctx: Context, args: UnblockArgs) -> MutationResult:
    """Unblock the build's waiting block step, with its fields."""
    channel = ctx.channel_for(args.pipeline)
    actor = ctx.agent.actor(channel)
    actions = BuildActions(ctx.services)
    current = await fetch_build(ctx, args.pipeline, args.number, fresh=True)
    step = next((j for j in current.jobs if j.type == "manual" and j.state == "blocked"), None)
    if step is None:
        raise Refused(f"Build #{args.number} of {args.pipeline} has no block step waiting.")
    value = UnblockButtonValue(pipeline=args.pipeline, number=args.number, job=step.id)
    target = await actions.unblock_form(value, actor)
    fields = dict(args.fields or {})
    _check_fields(target.form, fields)
    await actions.unblock(
        value,
        actor,
        label=target.label,
        fields=fields,
        thread=(channel, None),
        dedup_key=request_id_for("unblock", ctx.trigger),
    )
    build = await fetch_build(ctx, args.pipeline, args.number, fresh=True)
    return MutationResult(status="started", build=build_view(args.pipeline, build))


def _check_fields(form: BlockForm | None, fields: dict[str, str]) -> None:
    """Fields as a person's form would send them: known keys, required ones given, select
    values among the options, no control or invisible characters."""
    for key, value in fields.items():
        if not FIELD_KEY.match(key):
            raise Refused(f"The field key {key[:60]!r} is not letters, digits, /, - or _.")
        if len(value) > MAX_FIELD_VALUE:
            raise Refused(f"The field {key} is too long (at most {MAX_FIELD_VALUE} characters).")
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in value.replace("\n", "")):
            raise Refused(f"The field {key} has a control or invisible character.")
    if form is None:
        return
    known = {f.key: f for f in form.fields}
    for field in form.fields:  # what the person's form would have prefilled
        if field.key in fields:
            continue
        if field.kind == "select":
            if chosen := [o.value for o in field.initial_options]:
                fields[field.key] = "\n".join(chosen)
        elif field.default:
            fields[field.key] = field.default[0]
    if unknown := sorted(set(fields) - set(known)):
        raise Refused(
            f"The block step has no field {', '.join(unknown)}: "
            f"it has {', '.join(known) or 'none'}."
        )
    for field in form.fields:
        given = fields.get(field.key)
        if not given:
            if field.required:
                raise Refused(f"The block step's field {field.key} ({field.label}) is required.")
            continue
        if field.kind == "select":
            chosen = given.split("\n") if field.multiple else [given]
            allowed = {o.value for o in field.options}
            if bad := [c for c in chosen if c not in allowed]:
                raise Refused(
                    f"{bad[0][:60]!r} is not an option of the field {field.key}: use one of "
                    f"{', '.join(sorted(allowed))}."
                )
