"""The waits: on a build's recorded phase and on an approval, woken by the store's
announcements (app.agents.waiting), asking Buildkite nothing while they wait."""

from __future__ import annotations

import json
import time

from app.agents.arguments import (
    RequestArgs,
    Until,
    WaitBuildArgs,
    WaitRequestArgs,
)
from app.agents.context import Context, Refused
from app.agents.tools.reads import fetch_build
from app.agents.views import (
    BuildView,
    RequestResult,
    WaitBuildResult,
    build_view,
    plain_sentence,
)
from app.core.policy import Action
from app.storage.agents import approval_topic, build_topic
from app.storage.records import ApprovalOutcome, ApprovalStatus, TrackedBuild
from app.tracking.phases import FINAL_PHASES, phase_of
from buildkite.models import Build, BuildState


def _reached(until: Until, tracked: TrackedBuild | None) -> tuple[bool, bool]:
    """(stop waiting, reached) for a build's recorded phase."""
    if tracked is None:
        return True, False
    return _phase_reached(until, tracked.phase)


def _phase_reached(until: Until, phase: str) -> tuple[bool, bool]:
    final = phase in FINAL_PHASES
    if until is Until.FINISHED:
        return final, final
    if until is Until.BLOCKED:
        blocked = phase.endswith(":blocked")
        return blocked or final, blocked
    started = phase not in ("", BuildState.SCHEDULED.value, BuildState.CREATING.value)
    return started, started


async def wait_for_build(ctx: Context, args: WaitBuildArgs) -> WaitBuildResult:
    """Wait (≤ 50 s) until a build reaches a state, waking on the bot's own tracking: no
    Buildkite request while waiting. A build not followed yet is followed from now on when
    this agent may act on its pipeline; otherwise its state now is read once."""
    store = ctx.services.store
    tracked = await store.find(args.pipeline, args.number)
    if tracked is None:
        build = await fetch_build(ctx, args.pipeline, args.number)
        refusal = await _why_not_follow(ctx, args.pipeline)
        if refusal is not None:
            # Following would post in the agent's channel: only a right on the pipeline earns
            # that. The build as it is now, without waiting (nothing would wake the wait).
            phase, _ = phase_of(build)
            return WaitBuildResult(
                build=build_view(args.pipeline, build),
                reached=_phase_reached(args.until, phase)[1],
                reason=f"{refusal} This is its state now, read once: it was not waited on.",
            )
        channel = ctx.channel_for(args.pipeline)
        await ctx.services.tracker.track(
            build, pipeline=args.pipeline, channel=channel, requester=None
        )
        tracked = await store.find(args.pipeline, args.number)
        if tracked is None:
            raise Refused(f"The bot could not follow {args.pipeline} #{args.number}.")
    build_id = tracked.build_id
    timeout = min(args.timeout_seconds, ctx.services.tuning.agents.max_wait)
    last, _ = await ctx.changes.wait_until(
        build_topic(build_id),
        lambda: store.get(build_id),
        lambda t: _reached(args.until, t)[0],
        timeout=timeout,
    )
    return WaitBuildResult(build=_recorded(last), reached=_reached(args.until, last)[1])


#: Any of these on the pipeline lets an agent's wait make the bot follow a build there.
_FOLLOWING_RIGHTS = (Action.DEPLOY, Action.CANCEL, Action.REBUILD, Action.UNBLOCK)


async def _why_not_follow(ctx: Context, pipeline: str) -> str | None:
    """Why this agent may not make the bot follow (and post about) a build of `pipeline`: it
    has no channel there, or no right on it (bounded by its person's); None when it may."""
    policy = ctx.services.policy
    name = ctx.agent.name
    channel = policy.agent_channel(name, pipeline)
    if channel is None:
        return (
            f"The bot does not follow this build, and agent {name} has no channel for "
            f"{pipeline} to follow it in."
        )
    for action in _FOLLOWING_RIGHTS:
        decision = await policy.check(
            action,
            pipeline,
            user=ctx.agent.user_id,
            channel_id=channel,
            channel_name=None,
            resolve=ctx.services.directory.usergroup_members,
        )
        if decision.allowed:
            return None
    return (
        f"The bot does not follow this build, and agent {name} has no right on {pipeline} "
        "(deploy, cancel, rebuild or unblock) to make it follow one: that would post in its "
        "channel."
    )


def _recorded(tracked: TrackedBuild | None) -> BuildView | None:
    """A build as the bot's record keeps it (no jobs)."""
    if tracked is None or not tracked.snapshot:
        return None
    snapshot = {**tracked.snapshot, "id": tracked.build_id, "number": tracked.number}
    build = Build.model_validate(snapshot)
    view = build_view(tracked.pipeline, build)
    requester = next((t.requester for t in tracked.targets if t.requester), None)
    return view.model_copy(update={"created_by": requester or view.created_by})


async def get_request(ctx: Context, args: RequestArgs) -> RequestResult:
    """Where this agent's approval request stands."""
    outcome = await _own_approval(ctx, args.request_id)
    return await _request_result(ctx, outcome)


async def wait_for_request(ctx: Context, args: WaitRequestArgs) -> RequestResult:
    """Wait (≤ 50 s) until a person decides this agent's approval request and it takes effect."""
    await _own_approval(ctx, args.request_id)
    store = ctx.services.store
    timeout = min(args.timeout_seconds, ctx.services.tuning.agents.max_wait)
    last, _ = await ctx.changes.wait_until(
        approval_topic(args.request_id),
        lambda: store.approval_outcome(args.request_id),
        _decided,
        timeout=timeout,
    )
    if last is None:
        raise Refused("This approval request is gone (kept for a day after it expires).")
    return await _request_result(ctx, last)


def _decided(outcome: ApprovalOutcome | None) -> bool:
    if outcome is None:
        return True
    if outcome.status is ApprovalStatus.PENDING:
        return outcome.expires_at <= time.time()
    return outcome.settled or outcome.status is not ApprovalStatus.APPROVED


async def _own_approval(ctx: Context, request_id: str) -> ApprovalOutcome:
    outcome = await ctx.services.store.approval_outcome(request_id)
    requester = (
        json.loads(outcome.request).get("requester") if outcome and outcome.request else None
    )
    if outcome is None or requester != ctx.agent.user_id:
        raise Refused(f"There is no approval request {request_id} of agent {ctx.agent.name}.")
    return outcome


async def _request_result(ctx: Context, outcome: ApprovalOutcome) -> RequestResult:
    status = outcome.status
    pipeline = str(json.loads(outcome.request).get("pipeline") or "")
    if status is ApprovalStatus.PENDING:
        if outcome.expires_at <= time.time():
            return RequestResult(status="expired")
        return RequestResult(status="awaiting_approval")
    if status is ApprovalStatus.EXPIRED:
        return RequestResult(status="expired")
    if status is ApprovalStatus.APPROVED:
        build = None
        if outcome.build is not None:
            build = _recorded(await ctx.services.store.find(pipeline, outcome.build))
        reason = outcome.problem and plain_sentence(outcome.problem)
        if not outcome.settled:
            reason = "Approved; the build is being started."
        return RequestResult(status="approved", build=build, reason=reason or None)
    reason = plain_sentence(outcome.problem) if outcome.problem else None
    return RequestResult(status="rejected", reason=reason)
