"""One function per tool, each calling the same core services the Slack listeners call (deploys,
approvals, build actions, listings), so that policy, confirmations, locks, claims and audit are
theirs. The names, arguments and results are a public interface (docs/agents.md).

A tool function gets the call's `Context` (the agent, its services, a stable trigger for the
core's request claims) and its validated arguments, and returns a result model; a refusal is a
`UserError` (or a `Refused`), turned into a result by the gateway.
"""

from __future__ import annotations

import contextlib
import json
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.exceptions import RedisError

from app.agents.budget import Spend
from app.agents.identity import Agent
from app.agents.views import (
    AgentView,
    BuildView,
    CheckPolicyResult,
    GetBuildResult,
    HealthResult,
    ListAgentsResult,
    ListBuildsResult,
    ListPipelinesResult,
    MutationResult,
    RequestResult,
    View,
    WaitBuildResult,
    WhoAmIResult,
    build_view,
    health_view,
    pipeline_view,
    plain_sentence,
    untrusted,
)
from app.agents.waiting import Changes
from app.core.build_actions import BuildActions
from app.core.commands import COMMIT, BuildRef, DeployRequest, UsageError, check_branch
from app.core.commands.admin import AgentsQuery, HealthRequest, PipelinesQuery
from app.core.deploys import AwaitingApproval, Deploys, NeedsConfirmation, Started
from app.core.listings import Listings
from app.core.names import PIPELINE_SLUG_PATTERN
from app.core.policy import MAX_ENV_VARS, Action
from app.core.services import Services, request_id_for
from app.core.unblock_forms import FIELD_KEY, BlockForm
from app.slack.payloads import UnblockButtonValue
from app.storage.keys import REQUEST_TTL
from app.storage.records import ApprovalOutcome, ApprovalStatus, TrackedBuild
from app.tracking.phases import FINAL_PHASES
from buildkite.errors import BuildkiteError, PermissionDenied
from buildkite.models import Build, BuildState

MAX_MESSAGE = 1000
MAX_FIELDS = 98
MAX_FIELD_VALUE = 4000
LOG_TAIL_BYTES = 4000


class Refused(Exception):
    """A refusal the tool itself decides (not the core's): a plain sentence."""


@dataclass(frozen=True)
class Context:
    """What a tool call runs with."""

    agent: Agent
    services: Services
    changes: Changes
    #: The call's identity, the core's request claims are derived from (retries share it).
    trigger: str

    def channel_for(self, pipeline: str) -> str:
        """Where this agent acts on `pipeline`, or a refusal saying how to give it one."""
        channel = self.services.policy.agent_channel(self.agent.name, pipeline)
        if channel is None:
            raise Refused(
                f"Agent {self.agent.name} has no channel for {pipeline}: give it `channel:` "
                "(a channel id) in the policy's agents, or give the pipeline's rule a channel id "
                "first in `channels:`. Its build messages and approval requests are posted there."
            )
        return channel


# -- arguments ---------------------------------------------------------------------------------


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


Pipeline = Field(
    pattern=PIPELINE_SLUG_PATTERN,
    description="The pipeline's slug, as in its Buildkite URL (e.g. deploy-prod).",
)
Number = Field(ge=1, le=10**9, description="The build's number in its pipeline.")
IdempotencyKey = Field(
    default=None,
    min_length=1,
    max_length=200,
    pattern=r"^[A-Za-z0-9._:/-]+$",
    description="Any string: the same call retried with the same key is done once and returns "
    "the first result. Without one, a call's identity is its arguments within the minute.",
)


def _valid_branch(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_branch(value)
    except UsageError:
        raise ValueError("not a valid branch name (see git check-ref-format)") from None


class DeployArgs(Args):
    pipeline: str = Pipeline
    branch: str | None = Field(
        default=None, max_length=255, description="The branch (default: the pipeline's)."
    )
    commit: str | None = Field(
        default=None, description="HEAD (default) or a commit SHA of 7 to 40 hex characters."
    )
    message: str | None = Field(
        default=None, max_length=MAX_MESSAGE, description="The build's message."
    )
    env: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_ENV_VARS,
        description="Environment variables for the build (NAME: value); the policy may forbid "
        "some names.",
    )
    idempotency_key: str | None = IdempotencyKey

    _branch = field_validator("branch")(_valid_branch)

    @field_validator("commit")
    @classmethod
    def _commit(cls, value: str | None) -> str | None:
        if value is not None and not COMMIT.match(value):
            raise ValueError("use HEAD or a commit SHA of 7 to 40 hex characters")
        return value


class BuildArgs(Args):
    pipeline: str = Pipeline
    number: int = Number
    idempotency_key: str | None = IdempotencyKey


class UnblockArgs(BuildArgs):
    fields: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_FIELDS,
        description="The block step's fields (key: value; a multiple select's values one a "
        "line). The step's own form says which are required.",
    )


class GetBuildArgs(Args):
    pipeline: str = Pipeline
    number: int = Number


States = Literal[
    "running", "scheduled", "passed", "failing", "failed", "blocked", "canceled", "canceling"
]


class ListBuildsArgs(Args):
    pipeline: str | None = Field(
        default=None, pattern=PIPELINE_SLUG_PATTERN, description="Only this pipeline's builds."
    )
    state: States | None = Field(default=None, description="Only builds in this state.")
    branch: str | None = Field(default=None, max_length=255, description="Only this branch.")
    limit: int = Field(default=20, ge=1, le=50, description="How many, newest first (≤ 50).")

    _branch = field_validator("branch")(_valid_branch)


class ListPipelinesArgs(Args):
    filter: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,50}$",
        description="Only pipelines whose slug or name contains this.",
    )


class ListAgentsArgs(Args):
    queue: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="Only Buildkite agents of this queue.",
    )


class NoArgs(Args):
    pass


class HealthArgs(Args):
    pipeline: str | None = Field(
        default=None,
        pattern=r"^(all|[a-z0-9][a-z0-9-]{0,99})$",
        description="A pipeline's slug, or all (default).",
    )
    window: Literal["24h", "7d"] = Field(default="24h", description="The period: 24h or 7d.")


class Until(StrEnum):
    FINISHED = "finished"
    RUNNING = "running"
    BLOCKED = "blocked"


class WaitBuildArgs(Args):
    pipeline: str = Pipeline
    number: int = Number
    until: Until = Field(
        default=Until.FINISHED,
        description="finished (a final state), running (started or later) or blocked (waiting "
        "on a block step).",
    )
    timeout_seconds: float = Field(
        default=30, ge=0, le=50, description="How long to wait at most (≤ 50 s)."
    )


class RequestArgs(Args):
    request_id: str = Field(
        pattern=r"^[0-9a-f]{24}$", description="The request_id a deploy returned."
    )


class WaitRequestArgs(RequestArgs):
    timeout_seconds: float = Field(
        default=30, ge=0, le=50, description="How long to wait at most (≤ 50 s)."
    )


class PolicyAction(StrEnum):
    DEPLOY = "deploy"
    CANCEL = "cancel"
    REBUILD = "rebuild"
    RETRY = "retry"
    UNBLOCK = "unblock"


class CheckPolicyArgs(Args):
    action: PolicyAction = Field(description="deploy, cancel, rebuild, retry or unblock.")
    pipeline: str = Pipeline


# -- the mutations -------------------------------------------------------------------------------


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
    return _mutation(args.pipeline, outcome)


def _mutation(
    pipeline: str, outcome: Started | NeedsConfirmation | AwaitingApproval
) -> MutationResult:
    if isinstance(outcome, Started):
        return MutationResult(status="started", build=build_view(pipeline, outcome.build))
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
        return _mutation(args.pipeline, confirmed)
    return _mutation(args.pipeline, outcome)


async def retry_failed_jobs(ctx: Context, args: BuildArgs) -> MutationResult:
    """Retry a failed build's failed jobs (the same build, not a new one)."""
    channel = ctx.channel_for(args.pipeline)
    actor = ctx.agent.actor(channel)
    ref = BuildRef(args.pipeline, args.number)
    await BuildActions(ctx.services).retry_failed(
        ref, actor, thread=(channel, None), dedup_key=request_id_for("retry", ctx.trigger)
    )
    build = await _fetch(ctx, args.pipeline, args.number, fresh=True)
    return MutationResult(status="started", build=build_view(args.pipeline, build))


async def unblock_job(ctx: Context, args: UnblockArgs) -> MutationResult:
    """Unblock the build's waiting block step, with its fields."""
    channel = ctx.channel_for(args.pipeline)
    actor = ctx.agent.actor(channel)
    actions = BuildActions(ctx.services)
    current = await _fetch(ctx, args.pipeline, args.number, fresh=True)
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
    build = await _fetch(ctx, args.pipeline, args.number, fresh=True)
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


# -- the reads -----------------------------------------------------------------------------------


async def _fetch(ctx: Context, pipeline: str, number: int, *, fresh: bool = False) -> Build:
    """One build with its jobs, from Buildkite (shared by every agent for `read_cache`)."""
    what = f"build:{pipeline}:{number}"
    if not fresh:
        cached = await _cached(ctx, what)
        if cached is not None:
            return Build.model_validate_json(cached)
    build = await Listings(ctx.services).build(BuildRef(pipeline, number))
    raw = build.model_dump_json(by_alias=True)
    await _keep(ctx, what, raw, ctx.services.tuning.agents.read_cache)
    return build


async def _cached(ctx: Context, what: str) -> str | None:
    try:
        return await ctx.services.store.cached_read(what)
    except RedisError:
        return None


async def _keep(ctx: Context, what: str, value: str, ttl: float) -> None:
    with contextlib.suppress(RedisError):  # only a cache
        await ctx.services.store.cache_read(what, value, ttl=ttl)


async def get_build(ctx: Context, args: GetBuildArgs) -> GetBuildResult:
    """One build: its state, failed jobs and, when it failed, the end of the log."""
    what = f"view:{args.pipeline}:{args.number}"
    cached = await _cached(ctx, what)
    if cached is not None:
        return GetBuildResult.model_validate_json(cached)
    build = await _fetch(ctx, args.pipeline, args.number)
    tail = None
    job = build.log_tail_job if build.is_final else None
    if job is not None:
        try:
            tail = await ctx.services.buildkite.job_log_tail(
                args.pipeline, args.number, job.id, max_bytes=LOG_TAIL_BYTES
            )
        except PermissionDenied:
            tail = None  # the token lacks read_build_logs: the rest still answers
        except BuildkiteError:
            tail = None
    result = GetBuildResult(build=build_view(args.pipeline, build, log_tail=tail))
    await _keep(ctx, what, result.model_dump_json(), ctx.services.tuning.agents.read_cache)
    return result


async def list_builds(ctx: Context, args: ListBuildsArgs) -> ListBuildsResult:
    """Recent builds, newest first."""
    what = f"builds:{args.pipeline}:{args.state}:{args.branch}:{args.limit}"
    cached = await _cached(ctx, what)
    if cached is not None:
        return ListBuildsResult.model_validate_json(cached)
    builds = await Listings(ctx.services).recent_builds(
        pipeline=args.pipeline, state=args.state, branch=args.branch, limit=args.limit
    )
    result = ListBuildsResult(
        builds=[build_view(b.pipeline_slug or args.pipeline or "", b) for b in builds]
    )
    await _keep(ctx, what, result.model_dump_json(), ctx.services.tuning.agents.list_cache)
    return result


async def list_pipelines(ctx: Context, args: ListPipelinesArgs) -> ListPipelinesResult:
    """The organisation's pipelines (the first page) with their last build."""
    what = f"pipelines:{args.filter}"
    cached = await _cached(ctx, what)
    if cached is not None:
        return ListPipelinesResult.model_validate_json(cached)
    page = await Listings(ctx.services).pipelines_page(PipelinesQuery(filter=args.filter))
    result = ListPipelinesResult(
        pipelines=[
            pipeline_view(row.slug, row.name, row.web_url, row.default_branch, row.last_build)
            for row in page.rows
        ]
    )
    await _keep(ctx, what, result.model_dump_json(), ctx.services.tuning.agents.list_cache)
    return result


async def list_agents(ctx: Context, args: ListAgentsArgs) -> ListAgentsResult:
    """Buildkite's agents (the machines running jobs)."""
    what = f"agents:{args.queue}"
    cached = await _cached(ctx, what)
    if cached is not None:
        return ListAgentsResult.model_validate_json(cached)
    page = await Listings(ctx.services).agents_page(AgentsQuery(queue=args.queue))
    result = ListAgentsResult(
        agents=[
            AgentView(
                name=row.name,
                queue=row.queue,
                version=row.version,
                web_url=row.web_url,
                job=untrusted(row.job_name, 200),
            )
            for row in page.rows
        ]
    )
    await _keep(ctx, what, result.model_dump_json(), ctx.services.tuning.agents.list_cache)
    return result


async def whoami(ctx: Context, args: NoArgs) -> WhoAmIResult:
    """Who this agent is, and what the policy grants it by name (no Buildkite request)."""
    policy = ctx.services.policy
    me = ctx.agent.user_id
    rules = {"default": policy.data.default, **policy.data.pipelines}
    allowed = {
        pattern: [a.value for a in _GRANTABLE if me in (rule.allowed(a) or [])]
        for pattern, rule in rules.items()
    }
    return WhoAmIResult(
        agent=ctx.agent.name,
        acts_for=ctx.agent.acts_for,
        organization=ctx.services.buildkite.org,
        allowed={k: v for k, v in allowed.items() if v},
    )


_GRANTABLE = (Action.DEPLOY, Action.CANCEL, Action.REBUILD, Action.UNBLOCK)


async def build_health(ctx: Context, args: HealthArgs) -> HealthResult:
    """The health digest's figures: pass rate, durations, failures and flaky passes."""
    pipeline = None if args.pipeline in (None, "all") else args.pipeline
    what = f"health:{pipeline}:{args.window}"
    cached = await _cached(ctx, what)
    if cached is not None:
        return HealthResult.model_validate_json(cached)
    digest = await Listings(ctx.services).health(
        HealthRequest(pipeline=pipeline, window=args.window)
    )
    result = health_view(digest)
    await _keep(ctx, what, result.model_dump_json(), ctx.services.tuning.agents.list_cache)
    return result


def _reached(until: Until, tracked: TrackedBuild | None) -> tuple[bool, bool]:
    """(stop waiting, reached) for a build's recorded phase."""
    if tracked is None:
        return True, False
    phase = tracked.phase
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
    Buildkite request while waiting. A build not followed yet is followed from now on."""
    store = ctx.services.store
    tracked = await store.find(args.pipeline, args.number)
    if tracked is None:
        build = await _fetch(ctx, args.pipeline, args.number)
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
        f"build:{build_id}",
        lambda: store.get(build_id),
        lambda t: _reached(args.until, t)[0],
        timeout=timeout,
    )
    return WaitBuildResult(build=_recorded(last), reached=_reached(args.until, last)[1])


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
        f"approval:{args.request_id}",
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


async def check_policy(ctx: Context, args: CheckPolicyArgs) -> CheckPolicyResult:
    """Would this action be allowed now? A dry run: nothing is claimed, locked or posted."""
    policy = ctx.services.policy
    action = Action.REBUILD if args.action is PolicyAction.RETRY else Action(args.action.value)
    rule = policy.rule_for(args.pipeline)
    channel = policy.agent_channel(ctx.agent.name, args.pipeline)
    asks = rule.asks_first and action in (Action.DEPLOY, Action.REBUILD)
    approvers = policy.approvers(rule, requester=ctx.agent.user_id) if asks else []
    if channel is None:
        return CheckPolicyResult(
            allowed=False,
            needs_confirmation=asks,
            needs_approval=asks,
            approvers=approvers,
            reason=f"Agent {ctx.agent.name} has no channel for {args.pipeline}.",
        )
    decision = await policy.check(
        action,
        args.pipeline,
        user=ctx.agent.user_id,
        channel_id=channel,
        channel_name=None,
        resolve=ctx.services.directory.usergroup_members,
    )
    lock = await ctx.services.store.pipeline_lock(args.pipeline)
    locked_by = lock.user if lock and lock.user != ctx.agent.user_id else None
    bound = locked_by is not None and action is not Action.CANCEL
    allowed = decision.allowed and not bound
    if not decision.allowed:
        reason = plain_sentence(decision.reason)
    elif bound:
        reason = f"{args.pipeline} is locked by {locked_by}" + (
            f": {lock.reason}" if lock and lock.reason else "."
        )
    elif asks and not approvers:
        allowed, reason = (
            False,
            plain_sentence(
                f"`{args.pipeline}` is protected and its rule names nobody to approve an "
                "agent's deploy."
            ),
        )
    elif asks:
        reason = "Allowed; a person must approve it in Slack first."
    else:
        reason = "Allowed."
    return CheckPolicyResult(
        allowed=allowed,
        needs_confirmation=asks,
        needs_approval=asks,
        approvers=approvers,
        locked_by=locked_by,
        reason=reason,
    )


# -- the table -----------------------------------------------------------------------------------


ToolFunction = Callable[[Context, Any], Awaitable[View]]


@dataclass(frozen=True)
class Tool:
    name: str
    run: ToolFunction
    args: type[Args]
    result: type[View]
    spend: Spend
    read_only: bool
    destructive: bool
    idempotent: bool
    #: A mutation: its result is kept for retries (idempotency).
    mutation: bool = False

    @property
    def description(self) -> str:
        return (self.run.__doc__ or "").strip()


def _mutation_tool(name: str, run: ToolFunction, args: type[Args], *, destructive: bool) -> Tool:
    # Idempotent: the same call (its key, or its arguments within the minute) is done once.
    return Tool(name, run, args, MutationResult, Spend.MUTATION, False, destructive, True, True)


def _read_tool(name: str, run: ToolFunction, args: type[Args], result: type[View]) -> Tool:
    return Tool(name, run, args, result, Spend.READ, True, False, True)


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        _mutation_tool("deploy", deploy, DeployArgs, destructive=False),
        _mutation_tool("cancel_build", cancel_build, BuildArgs, destructive=True),
        _mutation_tool("rebuild_build", rebuild_build, BuildArgs, destructive=False),
        _mutation_tool("retry_failed_jobs", retry_failed_jobs, BuildArgs, destructive=False),
        _mutation_tool("unblock_job", unblock_job, UnblockArgs, destructive=False),
        _read_tool("get_build", get_build, GetBuildArgs, GetBuildResult),
        _read_tool("list_builds", list_builds, ListBuildsArgs, ListBuildsResult),
        _read_tool("list_pipelines", list_pipelines, ListPipelinesArgs, ListPipelinesResult),
        _read_tool("list_agents", list_agents, ListAgentsArgs, ListAgentsResult),
        _read_tool("whoami", whoami, NoArgs, WhoAmIResult),
        _read_tool("build_health", build_health, HealthArgs, HealthResult),
        _read_tool("wait_for_build", wait_for_build, WaitBuildArgs, WaitBuildResult),
        _read_tool("get_request", get_request, RequestArgs, RequestResult),
        _read_tool("wait_for_request", wait_for_request, WaitRequestArgs, RequestResult),
        _read_tool("check_policy", check_policy, CheckPolicyArgs, CheckPolicyResult),
    )
}
