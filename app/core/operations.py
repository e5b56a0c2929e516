"""The mutations people start from Slack (deploy, cancel, rebuild), independent of how they asked.

Each operation claims its request id in Redis first, so a duplicate delivery or a double click
changes nothing at Buildkite, then calls Buildkite once and hands the result to the tracker.
Anything that goes wrong becomes a `UserError` whose text is meant for the person who asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any, Self

import httpx
import redis.asyncio as redis
from redis.exceptions import RedisError

from app.core.audit import Auditor
from app.core.commands import (
    COMMIT,
    AuditRequest,
    BuildRef,
    DeployRequest,
    LockRequest,
    UnlockRequest,
    UsageError,
    check_branch,
)
from app.core.errors import UserError
from app.core.policy import Action, Policy, Rule, principal_ref
from app.core.routing import Router
from app.core.unblock_forms import BlockForm, form_in_pipeline
from app.settings import Settings
from app.slack.actor import Actor
from app.slack.directory import Directory
from app.slack.mrkdwn import code, escape, link, plain
from app.slack.outbox import Outbox, SlackDeliveryError, not_in_channel_text
from app.slack.payloads import UnblockButtonValue
from app.slack.render.builds import retried_reply, unblocked_reply
from app.slack.render.common import Rendered, notice
from app.slack.render.deploys import (
    DeployPlan,
    approval_request,
    confirm_deploy,
    lock_announcement,
    locked_text,
    plan_refusal,
)
from app.slack.response_urls import SlackHooks
from app.storage.store import (
    ACTION_TTL,
    AWAITED_TTL,
    REQUEST_TTL,
    AwaitedBuild,
    MessageTarget,
    Store,
    TrackedBuild,
)
from app.tracking.tracker import Tracker
from buildkite.client import BuildkiteClient
from buildkite.errors import (
    AuthenticationError,
    BuildkiteError,
    BuildkiteUnavailable,
    BuildMaybeStarted,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    ValidationFailed,
)
from buildkite.models import Build, BuildState, Job, Pipeline

log = logging.getLogger(__name__)

#: Deploys started by slash command that run at once, and that may wait for their turn.
DEPLOYS_RUNNING = 4
DEPLOYS_WAITING = 100
ANSWER_ON_CANCEL_TIMEOUT = 2.0

TRACKING_DOWN = (
    ":warning: Tracking is unavailable right now (the bot cannot reach its Redis), "
    "so nothing was started. Please try again in a minute."
)


class DeployQueue:
    """Deploys asked for by slash command: `running` at a time, the next `waiting` in the order
    they came; any more are refused when they are acknowledged.

    A burst of /deploy is acknowledged at once whatever happens; this bounds the work (and the
    Buildkite calls) it leaves behind, so the acks after it stay just as fast. Admission is
    decided in memory, before the ack, with no I/O.
    """

    def __init__(self, *, running: int = DEPLOYS_RUNNING, waiting: int = DEPLOYS_WAITING) -> None:
        if running < 1 or waiting < 0:
            raise ValueError("running must be at least 1 and waiting not negative")
        self.running = running
        self.waiting = waiting
        self._turns = asyncio.Semaphore(running)
        self._admitted = 0
        self._closed = asyncio.Event()

    def close(self) -> None:
        """Shutting down: deploys still waiting for their turn give up now (`QueueClosed`)."""
        self._closed.set()

    def reserve(self) -> DeployPlace | None:
        """A place in the queue, or None when it is full."""
        if self._admitted >= self.running + self.waiting:
            return None
        position = max(0, self._admitted - self.running + 1)
        self._admitted += 1
        return DeployPlace(self, position)


class QueueClosed(Exception):
    """The bot is shutting down: a deploy still waiting for its turn will not start."""


class DeployPlace:
    """One admitted deploy: wait for `turn()` inside `async with`; leaving frees the place."""

    def __init__(self, queue: DeployQueue, position: int) -> None:
        self._queue = queue
        #: 0 when it could start at once, else its place in line when it was admitted (1: next).
        self.position = position
        self._running = False
        self._left = False

    async def turn(self) -> None:
        """Wait until fewer than `running` deploys run (first come, first served).

        Raises `QueueClosed` if the bot starts shutting down first: the deploy never starts.
        """
        queue = self._queue
        if queue._closed.is_set():
            raise QueueClosed
        acquire = asyncio.ensure_future(queue._turns.acquire())
        closed = asyncio.ensure_future(queue._closed.wait())
        try:
            await asyncio.wait({acquire, closed}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            closed.cancel()
            self._give_up(acquire)
            raise
        closed.cancel()
        if queue._closed.is_set():
            self._give_up(acquire)
            raise QueueClosed
        self._running = True

    def _give_up(self, acquire: asyncio.Future[Any]) -> None:
        """Leave the line: a turn already granted is handed back, a pending wait cancelled."""
        if not acquire.done():
            acquire.cancel()  # Semaphore.acquire hands back a turn granted meanwhile itself
        elif not acquire.cancelled() and acquire.exception() is None:
            self._queue._turns.release()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._left:
            return
        self._left = True
        self._queue._admitted -= 1
        if self._running:
            self._queue._turns.release()


@dataclass
class Services:
    """The shared clients and services, created once per process and passed down via context."""

    settings: Settings
    http: httpx.AsyncClient
    redis: redis.Redis
    buildkite: BuildkiteClient
    store: Store
    outbox: Outbox
    tracker: Tracker
    policy: Policy
    directory: Directory
    auditor: Auditor
    router: Router
    #: The only way to a response_url outside Bolt's `respond` (see app.slack.response_urls).
    hooks: SlackHooks
    #: Listener tasks still working after their ack, awaited at shutdown.
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Slash-command deploys: how many run at once, and how many may wait for their turn.
    deploys: DeployQueue = field(default_factory=DeployQueue)

    async def finish_inflight(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (bounded) for acknowledged requests to finish what they started; deploys still
        waiting for their turn are told at once that they were not started."""
        self.deploys.close()
        current = asyncio.current_task()
        tasks = [t for t in self.inflight if t is not current and not t.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                log.warning("shutdown: a request was still running after %.0f s", timeout)
                task.cancel()
            if late:
                # Long enough for a canceled request to tell its user, before the clients close.
                await asyncio.wait(late, timeout=ANSWER_ON_CANCEL_TIMEOUT)


def request_id_for(*parts: str) -> str:
    """A short, stable id for a request, derived from what Slack sent."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def explain(exc: BuildkiteError, *, action: str, pipeline: str, number: int | None = None) -> str:
    """A human explanation of a Buildkite failure: which pipeline, which scope, what to do."""
    slug = code(pipeline)
    what = f"{slug} #{number}" if number is not None else slug
    if isinstance(exc, NotFound):
        if number is not None:
            return f"Build #{number} of pipeline {slug} was not found."
        return (
            f"Pipeline {slug} was not found in this Buildkite organisation. "
            "Check the slug in the pipeline's Buildkite URL."
        )
    if isinstance(exc, PermissionDenied):
        if exc.missing_scope:
            return (
                f"Could not {action} {what}: the bot's Buildkite API token lacks the "
                f"{code(exc.missing_scope)} scope. An admin can add it to the token in "
                "Buildkite's API Access Tokens settings."
            )
        return f"Could not {action} {what}: Buildkite says the bot's token may not do that (403)."
    if isinstance(exc, AuthenticationError):
        return (
            f"Could not {action} {what}: Buildkite rejected the bot's API token (401). "
            "An admin should check BUILDKITE_API_TOKEN."
        )
    if isinstance(exc, ValidationFailed):
        details = ", ".join(
            f"{e.get('field', '?')} {e.get('code', 'invalid')}" for e in exc.errors if e
        )
        reason = escape(exc.message + (f" ({details})" if details else ""))
        return f"Buildkite refused to {action} {what}: {reason}."
    if isinstance(exc, RateLimited):
        wait = f" in about {int(exc.reset)} s" if exc.reset else " in a minute"
        return (
            f"Could not {action} {what}: the Buildkite API rate limit is used up. "
            f"Please try again{wait}."
        )
    if (
        isinstance(exc, ServerError | BuildkiteUnavailable)
        and exc.method not in ("GET", "HEAD")
        and getattr(exc, "reached", True)
    ):
        # A write is not sent again after an answer that was lost: it may have been done.
        return (
            f"Buildkite's answer to {action} {what} was lost, so it may have been done; it was "
            "not sent again. Check the build in Buildkite before trying again."
        )
    if isinstance(exc, ServerError | BuildkiteUnavailable):
        return (
            f"Could not {action} {what}: Buildkite is not answering right now. "
            "Please try again in a minute."
        )
    message = escape(str(getattr(exc, "message", "") or "an unexpected error"))
    return f"Could not {action} {what}: Buildkite answered {message}."


@dataclass(frozen=True)
class UnblockTarget:
    """A block step about to be unblocked: its label, its build, and its form.

    `form` None means the bot does not know the step's fields; `problem` then says why, when
    there is more to say than "the step is not in the pipeline's steps" (an upload).
    """

    label: str
    build_url: str | None
    form: BlockForm | None
    problem: str | None = None


@dataclass(frozen=True)
class Started:
    build: Build


@dataclass(frozen=True)
class NeedsConfirmation:
    """A protected pipeline: the person must confirm this plan first."""

    rendered: Rendered


@dataclass(frozen=True)
class AwaitingApproval:
    approval_id: str


DeployOutcome = Started | NeedsConfirmation | AwaitingApproval


class Operations:
    """Deploy, cancel, rebuild, locks and approvals, as requested by a Slack user.

    Every mutation goes through the policy and is recorded in the audit trail, allowed or not.
    """

    def __init__(self, services: Services) -> None:
        self.s = services

    # -- checks ---------------------------------------------------------------------------

    async def _audit(
        self,
        actor: Actor,
        action: str,
        pipeline: str,
        outcome: str,
        *,
        build: Build | None = None,
        number: int | None = None,
        detail: str = "",
    ) -> None:
        await self.s.auditor.record(
            user=actor.user_id,
            action=action,
            pipeline=pipeline,
            channel=actor.channel_id,
            outcome=outcome,
            number=build.number if build else number,
            url=build.web_url if build else None,
            detail=detail,
        )

    async def _authorize(
        self, action: Action, pipeline: str, actor: Actor, *, number: int | None = None
    ) -> Rule:
        decision = await self.s.policy.check(
            action,
            pipeline,
            user=actor.user_id,
            channel_id=actor.channel_id,
            channel_name=actor.channel_name,
            resolve=self.s.directory.usergroup_members,
        )
        if not decision.allowed:
            await self._audit(
                actor,
                action.value,
                pipeline,
                "refused",
                number=number,
                detail=f"rule {decision.rule}",
            )
            raise UserError(f":no_entry: {decision.reason}")
        return self.s.policy.rule_for(pipeline)

    async def _check_lock(
        self, pipeline: str, actor: Actor, *, action: str = "deploy", build: BuildRef | None = None
    ) -> None:
        """Refuse when someone else holds the pipeline's lock.

        For an action inside a running `build` (retrying its failed jobs, unblocking it), the
        holder's own build may still be helped along by others, as an approval may: the lock
        then stops only builds that someone other than its holder asked for.
        """
        try:
            lock = await self.s.store.pipeline_lock(pipeline)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if lock and lock["user"] != actor.user_id and build is not None:
            try:
                current = await self.s.buildkite.get_build(build.pipeline, build.number)
            except BuildkiteError as exc:
                raise UserError(
                    explain(exc, action=action, pipeline=build.pipeline, number=build.number)
                ) from None
            if current.meta_data.get("chatops_requested_by") == lock["user"]:
                return
        if lock and lock["user"] != actor.user_id:
            await self._audit(
                actor,
                action,
                pipeline,
                "refused",
                number=build.number if build else None,
                detail=f"locked by {lock['user']}",
            )
            raise UserError(
                locked_text(pipeline, lock["user"], lock.get("reason"))
                + " Ask them to `/deploy unlock` it when they are done."
            )

    async def _claim(self, request_id: str, user_id: str, ttl: int = REQUEST_TTL) -> None:
        """Claim a request, or explain that it (or the same click by someone) is already handled."""
        try:
            first = await self.s.store.claim_request(request_id, user_id, ttl=ttl)
        except RedisError as exc:
            log.warning("redis unavailable while claiming a request: %s", exc)
            raise UserError(TRACKING_DOWN) from None
        if first is None:
            return
        if first == user_id:
            raise UserError(
                ":hourglass_flowing_sand: You already asked for this; it is being handled."
            )
        raise UserError(f":hourglass_flowing_sand: <@{first}> already asked for this a moment ago.")

    # -- deploy ---------------------------------------------------------------------------

    async def deploy(self, request: DeployRequest, actor: Actor, *, trigger: str) -> DeployOutcome:
        """Start a build (once per Slack request), or ask first when the pipeline is protected."""
        rule = await self._authorize(Action.DEPLOY, request.pipeline, actor)
        await self._check_env(rule, request.env, actor, action="deploy", pipeline=request.pipeline)
        await self._check_lock(request.pipeline, actor)
        request_id = request_id_for("deploy", trigger)
        await self._claim(request_id, actor.user_id)
        try:
            pipeline = await self.s.buildkite.get_pipeline(request.pipeline)
        except BuildkiteError as exc:
            await self._forget(request_id)
            await self._audit(actor, "deploy", request.pipeline, "failed", detail=str(exc))
            raise UserError(explain(exc, action="deploy", pipeline=request.pipeline)) from None
        plan = DeployPlan(
            pipeline=request.pipeline,
            branch=request.branch or pipeline.default_branch or "main",
            commit=request.commit,
            message=request.message or f"Deployed from Slack by @{actor.user_name}",
            env=dict(request.env),
            requester=actor.user_id,
        )
        if not rule.asks_first:
            return Started(await self._start(plan, actor, request_id=request_id))
        plan = await self._describe(plan, pipeline, rule)
        return await self._ask_first(plan, actor, request_id, claim=request_id)

    async def _check_env(
        self,
        rule: Rule,
        env: Mapping[str, str],
        actor: Actor,
        *,
        action: str,
        pipeline: str,
        number: int | None = None,
    ) -> None:
        """Refuse env names the policy forbids and values that could not be shown as sent."""
        refusal = rule.env_refusal(env)
        if refusal is None:
            return
        await self._audit(
            actor, action, pipeline, "refused", number=number, detail=f"env: rule {rule.name}"
        )
        raise UserError(f":no_entry: {refusal} Nothing was started.")

    async def _ask_first(
        self, plan: DeployPlan, actor: Actor, request_id: str, *, claim: str
    ) -> NeedsConfirmation:
        """Keep the plan for the requester's confirmation, if it can be shown in full."""
        refusal = plan_refusal(plan, request_id, request_id_for("approval", request_id))
        action = _plan_action(plan).value
        if refusal is not None:
            await self._forget(claim)
            await self._audit(actor, action, plan.pipeline, "refused", detail="too large to show")
            raise UserError(f":no_entry: {refusal}")
        try:
            await self.s.store.save_deploy_request(request_id, _plan_data(plan, actor))
        except RedisError:
            await self._forget(claim)
            raise UserError(TRACKING_DOWN) from None
        if plan.rebuild_of is not None:
            await self._audit(
                actor,
                action,
                plan.pipeline,
                "confirmation requested",
                number=plan.rebuild_of,
                detail="as a new build",
            )
        return NeedsConfirmation(confirm_deploy(plan, request_id))

    async def _describe(self, plan: DeployPlan, pipeline: Pipeline, rule: Rule) -> DeployPlan:
        """Resolve HEAD to the branch's last built SHA, and link the diff on GitHub."""
        last: Build | None = None
        last_passed: Build | None = None
        try:
            async for build in self.s.buildkite.list_builds(
                pipeline=plan.pipeline,
                branch=plan.branch,
                exclude_jobs=True,
                per_page=20,
                limit=20,
            ):
                last = last or build
                if build.state is BuildState.PASSED and last_passed is None:
                    last_passed = build
                if last_passed is not None:
                    break
        except BuildkiteError as exc:
            log.info("could not look up recent builds of %s: %s", plan.pipeline, exc)
        sha = plan.commit if plan.commit != "HEAD" else (last.commit if last else None)
        diff = None
        repo = _github_repo(pipeline.repository)
        if repo and last_passed and last_passed.commit and sha and last_passed.commit != sha:
            diff = f"https://github.com/{repo}/compare/{last_passed.commit}...{sha}"
        approvers = (
            tuple(principal_ref(p) for p in rule.approval.approvers) if rule.approval else ()
        )
        return replace(
            plan,
            resolved_sha=sha if plan.commit == "HEAD" else None,
            resolved_from=f"#{last.number}" if last and plan.commit == "HEAD" else None,
            diff_url=diff,
            approvers=approvers,
            expires_in=rule.approval.expires_after if rule.approval else None,
        )

    async def confirm(self, request_id: str, actor: Actor) -> DeployOutcome:
        """The requester confirmed a protected deploy: start it, or ask for approval."""
        plan, data = await self._own_request(request_id, actor, verb="confirm")
        action = _plan_action(plan)
        rule = await self._authorize(action, plan.pipeline, actor)
        await self._check_env(rule, plan.env, actor, action=action.value, pipeline=plan.pipeline)
        await self._check_lock(plan.pipeline, actor)
        if rule.approval is None:
            return Started(await self._start(plan, actor, request_id=request_id))
        approval_id = request_id_for("approval", request_id)
        expires_at = time.time() + rule.approval.expires_after
        await self.s.store.create_approval(approval_id, data, expires_at=expires_at)
        try:
            ts = await self.s.outbox.post(
                actor.channel_id, approval_request(plan, approval_id), key=approval_id
            )
        except SlackDeliveryError as exc:
            if not exc.no_access:
                raise
            await self._audit(actor, "deploy", plan.pipeline, "failed", detail=exc.error)
            raise UserError(
                f":warning: Nothing was started: the approval request for `{plan.pipeline}` "
                f"could not be posted. {not_in_channel_text(exc.error)} Then run `/deploy` "
                "again."
            ) from None
        await self.s.store.set_approval_message(approval_id, channel=actor.channel_id, ts=ts)
        await self._audit(actor, "deploy", plan.pipeline, "approval requested")
        return AwaitingApproval(approval_id)

    async def abort(self, request_id: str, actor: Actor) -> None:
        """The requester dropped their own confirmation (the Cancel button)."""
        plan, _ = await self._own_request(request_id, actor, verb="cancel")
        await self._audit(actor, _plan_action(plan).value, plan.pipeline, "dropped")

    async def _own_request(
        self, request_id: str, actor: Actor, *, verb: str
    ) -> tuple[DeployPlan, dict[str, Any]]:
        """Use up a waiting confirmation, only when `actor` is the one who asked for it."""
        expired = UserError("This confirmation has expired or was already used; nothing was done.")
        try:
            data = await self.s.store.deploy_request(request_id)
            if data is None:
                raise expired
            plan = _plan_from(data)
            if plan.requester != actor.user_id:
                what = "rebuild" if plan.rebuild_of is not None else "deploy"
                raise UserError(
                    f"Only <@{plan.requester}>, who asked, can {verb} this {what}; "
                    "nothing was changed."
                )
            if await self.s.store.take_deploy_request(request_id) is None:
                raise expired
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        return plan, data

    async def decide(self, approval_id: str, actor: Actor, *, approve: bool) -> Build | None:
        """An approver's click: the first valid decision wins; the requester cannot approve."""
        approval = await self.s.store.approval(approval_id)
        if approval is None:
            raise UserError("This approval request no longer exists.")
        data = approval["request"]
        plan = _plan_from(data)
        rule = self.s.policy.rule_for(plan.pipeline)
        action = "approve" if approve else "reject"
        if actor.user_id == plan.requester and approve:
            await self._audit(actor, action, plan.pipeline, "refused", detail="self-approval")
            raise UserError(
                "You cannot approve your own deploy: someone else from "
                f"{', '.join(plan.approvers) or 'the approvers'} has to."
            )
        approvers = rule.approval.approvers if rule.approval else []
        allowed = actor.user_id == plan.requester or actor.user_id in await self.s.policy.members(
            approvers, self.s.directory.usergroup_members
        )
        if not allowed:
            await self._audit(actor, action, plan.pipeline, "refused", detail="not an approver")
            raise UserError(
                f"Only {', '.join(plan.approvers) or 'the approvers'} may {action} this deploy."
            )
        refusal = await self._recheck(plan, data, approval, actor) if approve else None
        status = "rejected" if not approve else "refused" if refusal else "approved"
        result = await self.s.store.decide_approval(
            approval_id, status=status, user=actor.user_id, now=time.time()
        )
        if result == "expired!":
            await self._show_approval(approval, plan, "expired")
        if result != "ok":
            state = result.rstrip("!")
            raise UserError(f"This deploy request was already {state}; nothing was done.")
        if refusal is not None:
            await self._audit(actor, action, plan.pipeline, "refused", detail=refusal.detail)
            await self._show_approval(
                approval, plan, "refused", decided_by=actor.user_id, reason=refusal.text
            )
            raise UserError(f":no_entry: Approved, but not started: {refusal.text}")
        await self._audit(actor, action, plan.pipeline, "approved" if approve else "rejected")
        if not approve:
            await self._show_approval(approval, plan, "rejected", decided_by=actor.user_id)
            return None
        requester = Actor(
            user_id=plan.requester,
            user_name=str(data.get("user_name") or plan.requester),
            channel_id=approval["channel"] or actor.channel_id,
            channel_name=data.get("channel_name"),
        )
        try:
            build = await self._start(
                plan,
                requester,
                request_id=approval_id,
                thread=approval["ts"] or None,
                approved_by=actor.user_id,
            )
        except UserError:
            await self._show_approval(approval, plan, "approved", decided_by=actor.user_id)
            raise
        await self._show_approval(approval, plan, "approved", decided_by=actor.user_id, build=build)
        return build

    async def _recheck(
        self, plan: DeployPlan, data: dict[str, Any], approval: dict[str, Any], approver: Actor
    ) -> Refusal | None:
        """Check again, as the approval takes effect, what was checked when it was asked for."""
        action = _plan_action(plan)
        channel = approval.get("channel") or approver.channel_id
        decision = await self.s.policy.check(
            action,
            plan.pipeline,
            user=plan.requester,
            channel_id=channel,
            channel_name=data.get("channel_name"),
            resolve=self.s.directory.usergroup_members,
        )
        if not decision.allowed:
            return Refusal(
                f"<@{plan.requester}> may no longer {action.value} `{plan.pipeline}` from "
                f"<#{channel}> (policy rule `{decision.rule}`).",
                f"rule {decision.rule}",
            )
        rule = self.s.policy.rule_for(plan.pipeline)
        env_refusal = rule.env_refusal(plan.env)
        if env_refusal is not None:
            return Refusal(env_refusal, f"env: rule {rule.name}")
        try:
            lock = await self.s.store.pipeline_lock(plan.pipeline)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if lock and lock["user"] not in (plan.requester, approver.user_id):
            return Refusal(
                locked_text(plan.pipeline, lock["user"], lock.get("reason")).removeprefix(":lock: ")
                + " Ask again once it is unlocked.",
                f"locked by {lock['user']}",
            )
        try:
            await self.s.buildkite.get_pipeline(plan.pipeline)
        except NotFound:
            return Refusal(
                f"pipeline `{plan.pipeline}` no longer exists in Buildkite.", "pipeline gone"
            )
        except BuildkiteError as exc:  # not a refusal: the approval stays open for a new click
            raise UserError(explain(exc, action="deploy", pipeline=plan.pipeline)) from None
        return None

    async def expire_approvals(self) -> int:
        """Mark approvals past their time as expired and say so on their messages."""
        expired = 0
        for approval_id in await self.s.store.due_approvals(time.time()):
            result = await self.s.store.decide_approval(
                approval_id, status="expired", user="", now=time.time()
            )
            approval = await self.s.store.approval(approval_id)
            if result == "expired!" and approval is not None:
                await self._show_approval(approval, _plan_from(approval["request"]), "expired")
                expired += 1
        return expired

    async def _show_approval(
        self,
        approval: dict[str, Any],
        plan: DeployPlan,
        status: str,
        *,
        decided_by: str | None = None,
        build: Build | None = None,
        reason: str | None = None,
    ) -> None:
        if not approval.get("ts"):
            return
        rendered = approval_request(
            plan, None, status=status, decided_by=decided_by, build=build, reason=reason
        )
        await self.s.outbox.update(approval["channel"], approval["ts"], rendered)

    async def _start(
        self,
        plan: DeployPlan,
        actor: Actor,
        *,
        request_id: str,
        thread: str | None = None,
        approved_by: str | None = None,
    ) -> Build:
        author = await self.s.directory.author_for(actor.user_id)
        meta = {"chatops_requested_by": actor.user_id}
        if approved_by:
            meta["chatops_approved_by"] = approved_by
        await self._await(request_id, plan.pipeline, actor, thread=thread)
        try:
            build = await self.s.buildkite.create_build(
                plan.pipeline,
                commit=plan.commit,
                branch=plan.branch,
                message=plan.message,
                author=author,
                env=plan.env or None,
                meta_data=meta,
                request_id=request_id,
            )
        except BuildMaybeStarted as exc:
            raise await self._maybe_started(
                exc, request_id, "deploy", plan.pipeline, actor
            ) from None
        except BuildkiteError as exc:
            await self._forget(request_id)
            await self._stop_awaiting(request_id)
            await self._audit(actor, "deploy", plan.pipeline, "failed", detail=str(exc))
            raise UserError(explain(exc, action="deploy", pipeline=plan.pipeline)) from None
        await self._audit(actor, "deploy", plan.pipeline, "started", build=build)
        await self._track(build, plan.pipeline, actor, thread=thread)
        await self._stop_awaiting(request_id)
        return build

    # -- cancel and rebuild -----------------------------------------------------------------

    async def cancel(
        self, ref: BuildRef, actor: Actor, *, dedup_key: str, dedup_ttl: int = ACTION_TTL
    ) -> Build:
        """Cancel a running build, once per request.

        `dedup_key` names a button (anyone's click within `dedup_ttl`, 30 s, is the same
        request) or one Slack request (a slash command's trigger): that one is claimed for
        REQUEST_TTL, so that the same signed request replayed later does nothing.
        """
        await self._authorize(Action.CANCEL, ref.pipeline, actor, number=ref.number)
        await self._claim(dedup_key, actor.user_id, ttl=dedup_ttl)
        bk = self.s.buildkite
        try:
            try:
                build = await bk.cancel_build(ref.pipeline, ref.number)
            except ValidationFailed:
                current = await bk.get_build(ref.pipeline, ref.number)
                if current.is_final:
                    await self._audit(
                        actor,
                        "cancel",
                        ref.pipeline,
                        "refused",
                        build=current,
                        detail=f"already {current.state.value}",
                    )
                    raise UserError(
                        f"{link(current.web_url, f'{ref.pipeline} #{ref.number}')} already "
                        f"finished ({current.state.value}); there is nothing to cancel."
                    ) from None
                raise
        except BuildkiteError as exc:
            raise await self._refused(exc, dedup_key, actor, "cancel", ref) from None
        await self._audit(actor, "cancel", ref.pipeline, "requested", build=build)
        await self._observe(build)
        return build

    async def rebuild(
        self,
        ref: BuildRef,
        actor: Actor,
        *,
        dedup_key: str,
        trigger: str,
        dedup_ttl: int = ACTION_TTL,
    ) -> Started | NeedsConfirmation:
        """Rebuild a build; the new build is tracked in the original's thread when we know it.

        On a pipeline whose rule asks first, a rebuild is a deploy: see `_rebuild_as_deploy`.
        `dedup_key` and `dedup_ttl` are as for `cancel`.
        """
        rule = await self._authorize(Action.REBUILD, ref.pipeline, actor, number=ref.number)
        await self._check_lock(ref.pipeline, actor)
        await self._claim(dedup_key, actor.user_id, ttl=dedup_ttl)
        if rule.asks_first:
            return await self._rebuild_as_deploy(ref, actor, rule, dedup_key, trigger)
        thread_ts = None
        try:
            original = await self.s.store.find(ref.pipeline, ref.number)
            target = original.target(actor.channel_id) if original is not None else None
            if target is not None:
                thread_ts = target.reply_thread
        except RedisError:
            pass  # _track below reports the outage with the build's link
        request_id = request_id_for("rebuild", trigger)
        await self._await(request_id, ref.pipeline, actor, thread=thread_ts, rebuild_of=ref.number)
        try:
            build = await self.s.buildkite.rebuild_build(ref.pipeline, ref.number)
        except BuildMaybeStarted as exc:
            raise await self._maybe_started(
                exc, request_id, "rebuild", ref.pipeline, actor, number=ref.number
            ) from None
        except BuildkiteError as exc:
            await self._stop_awaiting(request_id)
            raise await self._refused(exc, dedup_key, actor, "rebuild", ref) from None
        await self._audit(
            actor, "rebuild", ref.pipeline, "started", build=build, detail=f"of #{ref.number}"
        )
        await self._track(build, ref.pipeline, actor, thread=thread_ts)
        await self._stop_awaiting(request_id)
        return Started(build)

    async def _rebuild_as_deploy(
        self, ref: BuildRef, actor: Actor, rule: Rule, dedup_key: str, trigger: str
    ) -> NeedsConfirmation:
        """A protected rebuild: confirm (and approve) it like a deploy, then create it as a NEW
        build of the original's commit, branch and env. Buildkite's rebuild would copy the
        original's meta_data, and with it an approval that nobody gave to this build."""
        bk = self.s.buildkite
        try:
            original = await bk.get_build(ref.pipeline, ref.number)
            pipeline = await bk.get_pipeline(ref.pipeline)
        except BuildkiteError as exc:
            raise await self._refused(exc, dedup_key, actor, "rebuild", ref) from None
        env = {str(k): str(v) for k, v in (original.env or {}).items()}
        branch = original.branch or pipeline.default_branch or "main"
        commit = original.commit or "HEAD"
        try:
            await self._check_env(
                rule, env, actor, action="rebuild", pipeline=ref.pipeline, number=ref.number
            )
            try:  # written by whoever started the original: checked like a typed /deploy
                check_branch(branch)
                if not COMMIT.match(commit):
                    raise UsageError(f"#{ref.number}'s commit is not a commit SHA.")
            except UsageError as exc:
                raise UserError(f":no_entry: Cannot rebuild it as a new build: {exc}") from None
        except UserError:
            await self._forget(dedup_key)
            raise
        plan = DeployPlan(
            pipeline=ref.pipeline,
            branch=branch,
            commit=commit,
            message=original.message or f"Rebuild of #{ref.number}",
            env=env,
            requester=actor.user_id,
            rebuild_of=ref.number,
        )
        plan = await self._describe(plan, pipeline, rule)
        request_id = request_id_for("rebuild", trigger)
        return await self._ask_first(plan, actor, request_id, claim=dedup_key)

    # -- unblock and retry ---------------------------------------------------------------

    async def unblock_form(self, value: UnblockButtonValue, actor: Actor) -> UnblockTarget:
        """Check the unblock is allowed, and find the block step's form (see unblock_forms)."""
        await self._authorize(Action.UNBLOCK, value.pipeline, actor, number=value.number)
        ref = BuildRef(value.pipeline, value.number)
        await self._check_lock(value.pipeline, actor, action="unblock", build=ref)
        bk = self.s.buildkite
        try:
            build = await bk.get_build(value.pipeline, value.number)
        except BuildkiteError as exc:
            raise UserError(
                explain(exc, action="unblock", pipeline=value.pipeline, number=value.number)
            ) from None
        job = next((j for j in build.jobs if j.id == value.job), None)
        if job is None or job.type != "manual":
            raise UserError("That block step is not part of this build any more.")
        if job.state != "blocked":
            raise UserError(
                f"*{plain(job.display_name)}* is not waiting any more "
                f"({escape(job.state or 'unknown')})."
            )
        label = job.label or job.name
        problem = None
        try:
            pipeline = await bk.get_pipeline(value.pipeline)
        except BuildkiteError as exc:
            log.warning("could not read the steps of %s for an unblock: %s", value.pipeline, exc)
            scope = exc.missing_scope if isinstance(exc, PermissionDenied) else None
            problem = "the bot could not read the pipeline's steps" + (
                f" (its token lacks the `{scope}` scope)" if scope else ""
            )
        else:
            form, problem = form_in_pipeline(
                pipeline.configuration, pipeline.steps, step_key=job.step_key, label=label
            )
            if form is not None:
                return UnblockTarget(job.display_name, build.web_url, form)
        form = self.s.policy.unblock_form(value.pipeline, step_key=job.step_key, label=label)
        return UnblockTarget(job.display_name, build.web_url, form, problem)

    async def unblock(
        self,
        value: UnblockButtonValue,
        actor: Actor,
        *,
        label: str,
        fields: dict[str, str],
        thread: tuple[str, str | None],
        dedup_key: str,
    ) -> None:
        """Unblock a block step (with its fields); the result goes to the build's thread."""
        await self._authorize(Action.UNBLOCK, value.pipeline, actor, number=value.number)
        ref = BuildRef(value.pipeline, value.number)
        await self._check_lock(value.pipeline, actor, action="unblock", build=ref)
        await self._claim(dedup_key, actor.user_id, ttl=ACTION_TTL)
        try:
            await self.s.buildkite.unblock_job(
                value.pipeline, value.number, value.job, fields=fields or None
            )
        except BuildkiteError as exc:
            await self._forget(dedup_key)
            await self._audit(
                actor, "unblock", value.pipeline, "failed", number=value.number, detail=str(exc)
            )
            raise
        await self._audit(
            actor, "unblock", value.pipeline, "unblocked", number=value.number, detail=label
        )
        channel, thread_ts = thread
        not_posted = await self._post_in_thread(
            value.pipeline,
            value.number,
            channel,
            thread_ts,
            unblocked_reply(actor.user_id, label, fields),
            key=dedup_key,
        )
        with contextlib.suppress(BuildkiteError, RedisError):
            await self.s.tracker.observe(
                await self.s.buildkite.get_build(value.pipeline, value.number)
            )
        if not_posted:
            raise UserError(f":unlock: Unblocked *{plain(label)}*. {not_posted}")

    async def retry_failed(
        self, ref: BuildRef, actor: Actor, *, thread: tuple[str, str | None], dedup_key: str
    ) -> list[Job]:
        """Retry a failed build's failed jobs (not a rebuild) and follow it again."""
        await self._authorize(Action.REBUILD, ref.pipeline, actor, number=ref.number)
        await self._check_lock(ref.pipeline, actor, action="retry", build=ref)
        await self._claim(dedup_key, actor.user_id, ttl=ACTION_TTL)
        bk = self.s.buildkite
        try:
            build = await bk.get_build(ref.pipeline, ref.number)
            failed = build.failed_jobs
            if not failed:
                raise UserError(
                    f"{link(build.web_url, f'{ref.pipeline} #{ref.number}')} has no failed jobs "
                    "to retry."
                )
            await bk.retry_failed_jobs(ref.pipeline, ref.number)
            fresh = await bk.get_build(ref.pipeline, ref.number)
        except BuildkiteError as exc:
            raise await self._refused(
                exc, dedup_key, actor, "retry", ref, verb="retry the failed jobs of"
            ) from None
        await self._audit(
            actor,
            "retry",
            ref.pipeline,
            "retried",
            build=fresh,
            detail=", ".join(j.display_name for j in failed),
        )
        channel, thread_ts = thread
        not_posted = await self._post_in_thread(
            ref.pipeline,
            ref.number,
            channel,
            thread_ts,
            retried_reply(actor.user_id, failed),
            key=dedup_key,
        )
        await self._follow_again(fresh, ref.pipeline, actor)
        if not_posted:
            title = link(fresh.web_url, f"{ref.pipeline} #{ref.number}")
            raise UserError(
                f":repeat: Retrying the failed jobs of {title}, but its progress cannot be "
                f"shown here. {not_posted}"
            )
        return failed

    async def auto_retry(self, tracked: TrackedBuild, build: Build) -> None:
        """Retry a failed build's jobs when its pipeline opted in, within the rule's bounds."""
        rule = self.s.policy.rule_for(tracked.pipeline).auto_retry
        if rule is None:
            return
        lock = await self.s.store.pipeline_lock(tracked.pipeline)
        asked_by = {build.meta_data.get("chatops_requested_by")} | {
            t.requester for t in tracked.targets
        }
        if lock and lock["user"] not in asked_by:
            # A freeze stops the bot's own re-runs too, as it stops everybody's Retry clicks.
            for target in tracked.targets:
                await self.s.outbox.post(
                    target.channel,
                    notice(
                        ":hourglass: Not auto-retried: "
                        + locked_text(
                            tracked.pipeline, lock["user"], lock.get("reason")
                        ).removeprefix(":lock: ")
                    ),
                    thread_ts=target.reply_thread,
                    key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:locked",
                )
            return
        attempt = await self.s.store.count_auto_retry(tracked.build_id)
        if attempt > rule.max_attempts:
            return
        if (
            await self.s.store.spend_retry_budget(tracked.pipeline, rule.hourly_budget, time.time())
            is None
        ):
            log.info(
                "auto-retry of %s #%s skipped: hourly budget of %d spent",
                tracked.pipeline,
                tracked.number,
                rule.hourly_budget,
            )
            for target in tracked.targets:
                await self.s.outbox.post(
                    target.channel,
                    notice(
                        f":hourglass: Not auto-retried: `{tracked.pipeline}` used its budget of "
                        f"{rule.hourly_budget} automatic retries this hour."
                    ),
                    thread_ts=target.reply_thread,
                    key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:budget",
                )
            return
        bk = self.s.buildkite
        try:
            full = await bk.get_build(tracked.pipeline, tracked.number)
            await bk.retry_failed_jobs(tracked.pipeline, tracked.number)
            fresh = await bk.get_build(tracked.pipeline, tracked.number)
        except BuildkiteError as exc:
            log.warning("auto-retry of %s #%s failed: %s", tracked.pipeline, tracked.number, exc)
            return
        await self.s.auditor.record(
            user="auto-retry",
            action="retry",
            pipeline=tracked.pipeline,
            channel="",
            outcome="retried",
            number=tracked.number,
            url=build.web_url,
            detail=f"attempt {attempt} of {rule.max_attempts}",
        )
        reply = retried_reply(None, full.failed_jobs, attempt=(attempt, rule.max_attempts))
        for target in tracked.targets:
            await self.s.outbox.post(
                target.channel,
                reply,
                thread_ts=target.reply_thread,
                key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:autoretry{attempt}",
            )
        await self.s.tracker.reopen(fresh)

    async def _follow_again(self, fresh: Build, pipeline: str, actor: Actor) -> None:
        tracked = await self.s.store.get(fresh.id)
        if tracked is not None:
            await self.s.tracker.reopen(fresh)
        else:
            await self._track(fresh, pipeline, actor)
            await self.s.store.mark_retried(fresh.id)

    async def _post_in_thread(
        self,
        pipeline: str,
        number: int,
        channel: str,
        thread_ts: str | None,
        reply: Rendered,
        *,
        key: str,
    ) -> str | None:
        """Post in the thread of the build's message in `channel` (or of the clicked message).

        `key` (the action's request id) keeps a post whose answer Slack lost from showing twice.
        Returns what to tell the person when the bot may not post in that channel.
        """
        tracked = await self.s.store.find(pipeline, number)
        target = tracked.target(channel) if tracked else None
        thread = (target.reply_thread if target else None) or thread_ts
        try:
            await self.s.outbox.post(channel, reply, thread_ts=thread, key=f"action:{key}")
        except SlackDeliveryError as exc:
            if not exc.no_access:
                raise
            return not_in_channel_text(exc.error)
        return None

    # -- locks and the audit trail ----------------------------------------------------------

    async def lock(self, request: LockRequest, actor: Actor) -> str:
        await self._authorize(Action.LOCK, request.pipeline, actor)
        holder = await self.s.store.lock_pipeline(
            request.pipeline,
            user=actor.user_id,
            reason=request.reason,
            ttl=request.ttl,
            now=time.time(),
        )
        if holder is not None and holder["user"] != actor.user_id:
            await self._audit(
                actor, "lock", request.pipeline, "refused", detail=f"held by {holder['user']}"
            )
            raise UserError(
                f":lock: `{request.pipeline}` is already locked by <@{holder['user']}>."
            )
        await self._audit(actor, "lock", request.pipeline, "locked", detail=request.reason)
        until = f" for {_human(request.ttl)}" if request.ttl else " until unlocked"
        return lock_announcement(actor.user_id, request.pipeline, until, request.reason)

    async def unlock(self, request: UnlockRequest, actor: Actor) -> str:
        lock = await self.s.store.pipeline_lock(request.pipeline)
        if lock is None:
            raise UserError(f"`{request.pipeline}` is not locked.")
        if lock["user"] != actor.user_id and not await self.s.policy.is_admin(
            actor.user_id, self.s.directory.usergroup_members
        ):
            await self._audit(
                actor, "unlock", request.pipeline, "refused", detail=f"held by {lock['user']}"
            )
            raise UserError(
                f"Only <@{lock['user']}>, who locked `{request.pipeline}`, or an admin can "
                "unlock it."
            )
        await self.s.store.unlock_pipeline(request.pipeline)
        await self._audit(actor, "unlock", request.pipeline, "unlocked")
        return f":unlock: <@{actor.user_id}> unlocked `{request.pipeline}`."

    async def audit_entries(self, request: AuditRequest, actor: Actor) -> list[dict[str, str]]:
        """The audit trail, for admins (everything) or a pipeline's deployers (that pipeline)."""
        resolve = self.s.directory.usergroup_members
        admin = await self.s.policy.is_admin(actor.user_id, resolve)
        open_policy = not self.s.policy.admins
        if not admin:
            if request.pipeline is None and not open_policy:
                raise UserError("Only admins can see the whole audit trail; name a pipeline.")
            if request.pipeline is not None:
                rule = self.s.policy.rule_for(request.pipeline)
                allowed = rule.allowed(Action.DEPLOY)
                if allowed is not None and actor.user_id not in await self.s.policy.members(
                    allowed, resolve
                ):
                    raise UserError(
                        f"Only admins and those who may deploy `{request.pipeline}` can see its "
                        "audit trail."
                    )
        return await self.s.store.audit_entries(pipeline=request.pipeline, limit=AUDIT_SHOWN)

    # -- plumbing ---------------------------------------------------------------------------

    async def _track(
        self, build: Build, pipeline: str, actor: Actor, *, thread: str | None = None
    ) -> None:
        try:
            await self.s.tracker.track(
                build,
                pipeline=pipeline,
                channel=actor.channel_id,
                requester=actor.user_id,
                thread_ts=thread,
                notify_url=actor.response_url,
            )
        except RedisError as exc:
            log.error("build %s started but could not be tracked: %s", build.web_url, exc)
            title = link(build.web_url, f"{pipeline} #{build.number}")
            raise UserError(
                f":warning: Your build was started: {title}, but tracking is unavailable right "
                "now (the bot cannot reach its Redis), so its progress will not be posted here. "
                "Follow it in Buildkite."
            ) from None

    async def _observe(self, build: Build) -> None:
        try:
            await self.s.tracker.observe(build)
        except RedisError as exc:
            log.warning("could not record the new state of %s: %s", build.web_url, exc)

    # -- builds asked for without an answer ------------------------------------------------

    async def _await(
        self,
        request_id: str,
        pipeline: str,
        actor: Actor,
        *,
        thread: str | None,
        rebuild_of: int | None = None,
    ) -> None:
        """Note the build about to be asked for before asking, so that if no answer comes (or
        this process dies waiting) the poller adopts it when it appears, once."""
        now = time.time()
        awaited = AwaitedBuild(
            request_id=request_id,
            pipeline=pipeline,
            rebuild_of=rebuild_of,
            sent_at=now,
            until=now + AWAITED_TTL,
            target=MessageTarget(
                channel=actor.channel_id,
                requester=actor.user_id,
                thread_ts=thread,
                notify_url=actor.response_url,
            ),
        )
        # Looked for by the poller only once this process should have given up itself.
        lookup = self.s.buildkite.start_lookup.patience
        look_at = now + 2 * (self.s.settings.buildkite_timeout + lookup)
        try:
            await self.s.store.await_build(awaited, look_at=look_at)
        except RedisError as exc:
            log.warning("could not note the build asked for by %s: %s", request_id, exc)

    async def _stop_awaiting(self, request_id: str) -> None:
        with contextlib.suppress(RedisError):
            await self.s.store.take_awaited(request_id)

    async def _maybe_started(
        self,
        exc: BuildMaybeStarted,
        request_id: str,
        action: str,
        pipeline: str,
        actor: Actor,
        *,
        number: int | None = None,
    ) -> UserError:
        """No answer and no build found: say so plainly, and leave the build to the poller."""
        log.warning("%s of %s may have started (request %s): %s", action, pipeline, request_id, exc)
        await self._audit(actor, action, pipeline, "unknown", number=number, detail=str(exc))
        try:
            await self.s.store.look_for_awaited(request_id, at=time.time())
        except RedisError:
            follow = "but cannot reach its Redis right now, so it may not post it here"
        else:
            follow = "and will post the build here if it appears"
        what = f"the rebuild of #{number}" if number is not None else "the deploy"
        builds = link(
            f"https://buildkite.com/{self.s.buildkite.org}/{pipeline}/builds",
            "the pipeline's builds",
        )
        return UserError(
            f":warning: Buildkite did not confirm {what} of `{pipeline}` (no answer in time, or an "
            f"error after it was sent), so it may have started. The bot did not send it again, "
            f"{follow}. Check {builds} before asking again."
        )

    async def _refused(
        self,
        exc: BuildkiteError,
        dedup_key: str,
        actor: Actor,
        action: str,
        ref: BuildRef,
        *,
        verb: str | None = None,
    ) -> UserError:
        """Buildkite refused a mutation of `ref`: free its claim, audit it, and say why."""
        await self._forget(dedup_key)
        await self._audit(actor, action, ref.pipeline, "failed", number=ref.number, detail=str(exc))
        return UserError(
            explain(exc, action=verb or action, pipeline=ref.pipeline, number=ref.number)
        )

    async def _forget(self, request_id: str) -> None:
        # The mutation never happened, so a retry by the user must not be taken for a duplicate.
        with contextlib.suppress(RedisError):
            await self.s.store.release_request(request_id)


AUDIT_SHOWN = 15


def _github_repo(repository: str | None) -> str | None:
    """`owner/name` of a GitHub repository URL (https or ssh), else None."""
    if not repository:
        return None
    match = re.match(
        r"^(?:https://github\.com/|git@github\.com:)([\w.-]+/[\w.-]+?)(?:\.git)?/?$", repository
    )
    return match.group(1) if match else None


@dataclass(frozen=True)
class Refusal:
    """Why a decision cannot take effect now: `text` for people, `detail` for the audit trail."""

    text: str
    detail: str


def _plan_action(plan: DeployPlan) -> Action:
    return Action.REBUILD if plan.rebuild_of is not None else Action.DEPLOY


def _plan_data(plan: DeployPlan, actor: Actor) -> dict[str, Any]:
    data = asdict(plan)
    data["approvers"] = list(plan.approvers)
    data.update(user_name=actor.user_name, channel_name=actor.channel_name)
    return data


def _plan_from(data: dict[str, Any]) -> DeployPlan:
    fields = {f.name for f in dataclass_fields(DeployPlan)}
    values = {k: v for k, v in data.items() if k in fields}
    values["approvers"] = tuple(values.get("approvers") or ())
    values["env"] = dict(values.get("env") or {})
    return DeployPlan(**values)


def _human(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
