"""The reads: one build, listings, the health figures, whoami and the policy's dry run, each
answered from a brief Redis cache shared by every agent and replica."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel
from redis.exceptions import RedisError

import app.slack.render.freezes as freeze_texts
import app.slack.render.releases as releases_texts
from app.agents.arguments import (
    CheckPolicyArgs,
    GetBuildArgs,
    HealthArgs,
    ListAgentsArgs,
    ListBuildsArgs,
    ListPipelinesArgs,
    NoArgs,
    PolicyAction,
)
from app.agents.context import Context, Refused
from app.agents.views import (
    AgentView,
    CheckPolicyResult,
    GetBuildResult,
    HealthResult,
    ListAgentsResult,
    ListBuildsResult,
    ListPipelinesResult,
    WhoAmIResult,
    build_view,
    capped,
    health_view,
    pipeline_view,
    plain_sentence,
    untrusted,
)
from app.core.commands import BuildRef
from app.core.commands.admin import AgentsQuery, HealthRequest, PipelinesQuery
from app.core.freezes import FROZEN_ACTIONS, view_of
from app.core.listings import Listings
from app.core.policy import Action, Rule
from app.core.releases import NoRollback, live_deployment, rollback_target
from app.storage.ledger import Deployment
from buildkite.errors import BuildkiteError, PermissionDenied
from buildkite.models import Build

LOG_TAIL_BYTES = 4000


M = TypeVar("M", bound=BaseModel)


async def through_cache(
    ctx: Context,
    what: str,
    model: type[M],
    ttl: float,
    compute: Callable[[], Awaitable[M]],
    *,
    fresh: bool = False,
) -> M:
    """`compute()`'s answer, kept `ttl` seconds for every agent and replica under `what`;
    `fresh` computes it anew (and keeps that). Only a cache: Redis failing costs a compute."""
    if not fresh:
        try:
            hit = await ctx.services.store.cached_read(what)
        except RedisError:
            hit = None
        if hit is not None:
            return model.model_validate_json(hit)
    value = await compute()
    with contextlib.suppress(RedisError):
        await ctx.services.store.cache_read(what, value.model_dump_json(by_alias=True), ttl=ttl)
    return value


async def fetch_build(ctx: Context, pipeline: str, number: int, *, fresh: bool = False) -> Build:
    """One build with its jobs, from Buildkite (shared by every agent for `read_cache`)."""
    return await through_cache(
        ctx,
        f"build:{pipeline}:{number}",
        Build,
        ctx.services.tuning.agents.read_cache,
        lambda: Listings(ctx.services).build(BuildRef(pipeline, number)),
        fresh=fresh,
    )


async def get_build(ctx: Context, args: GetBuildArgs) -> GetBuildResult:
    """One build: its state, failed jobs and, when it failed, the end of the log."""

    async def compute() -> GetBuildResult:
        build = await fetch_build(ctx, args.pipeline, args.number)
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
        tracked = None
        with contextlib.suppress(RedisError):
            tracked = await ctx.services.store.find(args.pipeline, args.number)
        requester = (
            next((t.requester for t in tracked.targets if t.requester), None) if tracked else None
        )
        return GetBuildResult(
            build=build_view(args.pipeline, build, log_tail=tail, requested_by=requester)
        )

    what = f"view:{args.pipeline}:{args.number}"
    return await through_cache(
        ctx, what, GetBuildResult, ctx.services.tuning.agents.read_cache, compute
    )


async def list_builds(ctx: Context, args: ListBuildsArgs) -> ListBuildsResult:
    """Recent builds, newest first."""

    async def compute() -> ListBuildsResult:
        builds = await Listings(ctx.services).recent_builds(
            pipeline=args.pipeline, state=args.state, branch=args.branch, limit=args.limit
        )
        return ListBuildsResult(
            builds=[build_view(b.pipeline_slug or args.pipeline or "", b) for b in builds]
        )

    what = f"builds:{args.pipeline}:{args.state}:{args.branch}:{args.limit}"
    return await through_cache(
        ctx, what, ListBuildsResult, ctx.services.tuning.agents.list_cache, compute
    )


async def list_pipelines(ctx: Context, args: ListPipelinesArgs) -> ListPipelinesResult:
    """The organisation's pipelines (the first page) with their last build."""

    async def compute() -> ListPipelinesResult:
        page = await Listings(ctx.services).pipelines_page(PipelinesQuery(filter=args.filter))
        return ListPipelinesResult(
            pipelines=[
                pipeline_view(row.slug, row.name, row.web_url, row.default_branch, row.last_build)
                for row in page.rows
            ]
        )

    what = f"pipelines:{args.filter}"
    return await through_cache(
        ctx, what, ListPipelinesResult, ctx.services.tuning.agents.list_cache, compute
    )


async def list_agents(ctx: Context, args: ListAgentsArgs) -> ListAgentsResult:
    """Buildkite's agents (the machines running jobs)."""

    async def compute() -> ListAgentsResult:
        page = await Listings(ctx.services).agents_page(AgentsQuery(queue=args.queue))
        return ListAgentsResult(
            agents=[
                AgentView(
                    name=capped(row.name),
                    queue=capped(row.queue),
                    version=capped(row.version),
                    web_url=row.web_url,
                    job=untrusted(row.job_name, 200),
                )
                for row in page.rows
            ]
        )

    what = f"agents:{args.queue}"
    return await through_cache(
        ctx, what, ListAgentsResult, ctx.services.tuning.agents.list_cache, compute
    )


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

    async def compute() -> HealthResult:
        digest = await Listings(ctx.services).health(
            HealthRequest(pipeline=pipeline, window=args.window)
        )
        return health_view(digest)

    what = f"health:{pipeline}:{args.window}"
    return await through_cache(
        ctx, what, HealthResult, ctx.services.tuning.agents.list_cache, compute
    )


#: The policy's action for each of check_policy's: a retry is a rebuild's right, a rollback
#: and a promotion are deploys.
_POLICY_ACTIONS = {
    PolicyAction.RETRY: Action.REBUILD,
    PolicyAction.ROLLBACK: Action.DEPLOY,
    PolicyAction.PROMOTE: Action.DEPLOY,
}
#: What a refusal calls the action: "The promotion would not be started."
_NOUNS = {PolicyAction.ROLLBACK: "rollback", PolicyAction.PROMOTE: "promotion"}


def _dry_run(mrkdwn: str) -> str:
    """A core's refusal, as plain text about what would (not) happen."""
    return (
        plain_sentence(mrkdwn)
        .replace(" Nothing was started.", " Nothing would be started.")
        .replace(" was not started.", " would not be started.")
    )


async def check_policy(ctx: Context, args: CheckPolicyArgs) -> CheckPolicyResult:
    """Would this action be allowed now? A dry run: nothing is claimed, locked or posted."""
    policy = ctx.services.policy
    action = _POLICY_ACTIONS.get(args.action) or Action(args.action.value)
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
    frozen = (
        policy.active_freeze(args.pipeline, ctx.services.tuning.clock())
        if action.value in FROZEN_ACTIONS
        else None
    )
    # What the ledger says a rollback or a promotion would deploy, or why there is nothing.
    release = (
        await _release_plan(ctx, args.action, args.pipeline, rule)
        if decision.allowed and frozen is None
        else None
    )
    allowed = decision.allowed and not bound and frozen is None
    if not decision.allowed:
        reason = plain_sentence(decision.reason)
    elif frozen is not None:
        noun = _NOUNS.get(args.action, action.value)
        reason = _dry_run(
            freeze_texts.frozen(args.pipeline, noun, view_of(frozen), break_glass=False)
        )
    elif release is not None and not release[0]:
        allowed, reason = False, release[1]
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
    if allowed and release is not None:
        reason = f"{reason} {release[1]}"
    return CheckPolicyResult(
        allowed=allowed,
        needs_confirmation=asks,
        needs_approval=asks,
        approvers=approvers,
        locked_by=locked_by,
        frozen_until=frozen.end.isoformat() if frozen is not None else None,
        reason=reason,
    )


async def _release_plan(
    ctx: Context, action: PolicyAction, pipeline: str, rule: Rule
) -> tuple[bool, str] | None:
    """(possible, what it would deploy or why not) for a rollback or a promotion, read from
    the ledger as `Releases` reads it (no Buildkite request); None for the other actions."""
    if action is PolicyAction.ROLLBACK:
        entries = await _ledger(ctx, pipeline)
        try:
            chosen = rollback_target(pipeline, entries, None)
        except NoRollback as exc:
            return False, _dry_run(releases_texts.no_rollback(str(exc)))
        live, target = chosen.live, chosen.target
        return True, (
            f"It would deploy again {capped(target.commit[:12])} of "
            f"{capped(target.branch) or 'no branch'} from "
            f"#{target.number}, the passed deployment before #{live.number}, live now."
        )
    if action is PolicyAction.PROMOTE:
        source = rule.promote_from
        if source is None:
            return False, _dry_run(releases_texts.no_promote_rule(pipeline, rule.name))
        passed = live_deployment(await _ledger(ctx, source))
        if passed is None:
            return False, _dry_run(releases_texts.nothing_live_on(source, pipeline))
        return True, (
            f"It would deploy {capped(passed.commit[:12])} of "
            f"{capped(passed.branch) or 'no branch'}, live on "
            f"{source} as #{passed.number}."
        )
    return None


async def _ledger(ctx: Context, pipeline: str) -> list[Deployment]:
    """The ledger as check_policy's dry run reads it: nothing written, not even the index's
    forgetting of expired entries."""
    try:
        return await ctx.services.store.deployments(pipeline, prune=False)
    except RedisError:
        raise Refused(plain_sentence(releases_texts.LEDGER_DOWN)) from None
