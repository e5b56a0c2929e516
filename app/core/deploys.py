"""Deploys: start one, or ask first (confirm) on a protected pipeline; a protected rebuild
is asked for like a deploy.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields

from redis.exceptions import RedisError

from app.core.actions import Actions
from app.core.commands import COMMIT, BuildRef, DeployRequest, UsageError, check_branch
from app.core.errors import UserError, explain
from app.core.freezes import Occurrence, view_of
from app.core.policy import Action, Policy, Rule, principal_ref
from app.core.releases import check_promotion
from app.core.services import request_id_for
from app.slack.actor import Actor
from app.slack.outbox import SlackDeliveryError, not_in_channel_text
from app.slack.render import freezes as freeze_texts
from app.slack.render import releases as release_texts
from app.slack.render import texts
from app.slack.render.common import Rendered, notice
from app.slack.render.deploys import (
    DeployPlan,
    approval_request,
    confirm_deploy,
    plan_kind,
    plan_refusal,
    plan_summary,
)
from app.slack.render.texts import TRACKING_DOWN
from app.storage.records import ApprovalStatus, PendingDeploy
from buildkite.errors import BuildkiteError
from buildkite.models import Build, BuildState, Pipeline

log = logging.getLogger(__name__)

#: How long a break-glass approval waits, on a rule without an approval of its own.
BREAK_GLASS_EXPIRY = 1800


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


@dataclass(frozen=True)
class DeployOrigin:
    """What a deploy is, when it is more than a deploy: a rollback or a promotion (see
    app.core.release_actions). Carried into the plan and the build's meta_data."""

    rollback_of: int | None = None
    rollback_from: str | None = None
    promoted_from: str | None = None
    #: A compare link from the live commit to the one deployed.
    diff_url: str | None = None


class _AlreadyBreaking(UserError):
    """The person's break-glass request on this pipeline is open already."""


class Deploys(Actions):
    """Deploy, confirm and abort, as requested by a Slack user."""

    async def deploy(
        self,
        request: DeployRequest,
        actor: Actor,
        *,
        trigger: str,
        origin: DeployOrigin | None = None,
    ) -> DeployOutcome:
        """Start a build (once per Slack request), or ask first when the pipeline is protected."""
        origin = origin or DeployOrigin()
        breaking = request.break_glass is not None
        what = "rollback" if origin.rollback_of is not None else None
        what = what or ("promote" if origin.promoted_from else None)
        rule = await self._authorize(
            Action.DEPLOY, request.pipeline, actor, break_glass=breaking, what=what
        )
        asked_at = self.s.tuning.clock()  # one moment: the freeze gone through, and its keys
        frozen = (
            await self._break_glass_freeze(request, actor, rule, asked_at) if breaking else None
        )
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
            rollback_of=origin.rollback_of,
            rollback_from=origin.rollback_from,
            promoted_from=origin.promoted_from,
            diff_url=origin.diff_url,
            break_glass=request.break_glass,
            freeze=frozen_text(frozen) if frozen is not None else None,
            freeze_keys=(
                [o.key for o in self.s.policy.freezes_in_force(request.pipeline, asked_at)]
                if frozen is not None
                else None
            ),
            acts_for=self.s.policy.acts_for(actor.user_id),
        )
        if rule.promote_from and origin.rollback_of is None:
            plan = await self._promotable(plan, rule, actor, request_id)
        if not rule.asks_first and not breaking:
            return Started(await self._start(plan, actor, request_id=request_id))
        plan = await self._describe(plan, pipeline, rule)
        if breaking:
            return await self._break_glass(plan, actor, rule, request_id)
        return await self._ask_first(plan, actor, request_id, claim=request_id)

    async def _ask_first(
        self, plan: DeployPlan, actor: Actor, request_id: str, *, claim: str
    ) -> NeedsConfirmation:
        """Keep the plan for the requester's confirmation, if it can be shown in full."""
        refusal = plan_refusal(plan, request_id, request_id_for("approval", request_id))
        action = plan_action(plan).value
        if refusal is not None:
            await self._forget(claim)
            await self._audit(actor, action, plan.pipeline, "refused", detail="too large to show")
            raise UserError(texts.refused(refusal))
        try:
            await self.s.store.save_deploy_request(request_id, plan_data(plan, actor))
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

    async def _promotable(
        self, plan: DeployPlan, rule: Rule, actor: Actor, request_id: str
    ) -> DeployPlan:
        """A rule with `promote_from` deploys only a commit that passed a deployment there:
        the plan then names that commit (HEAD resolved), so what is built is what passed."""
        source = rule.promote_from or ""
        try:
            promotion = await check_promotion(
                self.s.store,
                self.s.buildkite,
                self.s.policy,
                pipeline=plan.pipeline,
                source=source,
                branch=plan.branch,
                commit=plan.commit,
            )
        except RedisError:
            await self._forget(request_id)
            raise UserError(TRACKING_DOWN) from None
        if promotion.passed is None or promotion.commit is None:
            await self._forget(request_id)
            await self._audit(
                actor, "deploy", plan.pipeline, "refused", detail=f"not passed on {source}"
            )
            history = f"https://buildkite.com/{self.s.buildkite.org}/{source}/builds"
            raise UserError(
                release_texts.not_promoted(
                    plan.pipeline, source, rule.name, plan.commit, promotion.commit, history
                )
            )
        passed = f"{source}#{promotion.passed.number}"
        return replace(plan, commit=promotion.commit, promoted_from=plan.promoted_from or passed)

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
        repo = github_repo(pipeline.repository)
        if repo and last_passed and last_passed.commit and sha and last_passed.commit != sha:
            diff = f"https://github.com/{repo}/compare/{last_passed.commit}...{sha}"
        who = approvers_of(plan, rule, self.s.policy)
        return replace(
            plan,
            resolved_sha=sha if plan.commit == "HEAD" else None,
            resolved_from=f"#{last.number}" if last and plan.commit == "HEAD" else None,
            diff_url=plan.diff_url or diff,
            approvers=tuple(principal_ref(p) for p in who),
            expires_in=approval_expiry(plan, rule, self.s.policy),
        )

    async def confirm(self, request_id: str, actor: Actor) -> DeployOutcome:
        """The requester confirmed a protected deploy: start it, or ask for approval.

        An agent's protected deploy always waits for a person's approval (see app.agents).
        """
        plan, data = await self._own_request(request_id, actor, verb="confirm")
        action = plan_action(plan)
        breaking = plan.break_glass is not None
        rule = await self._authorize(
            action, plan.pipeline, actor, break_glass=breaking, what=plan_verb(plan)
        )
        await self._check_env(rule, plan.env, actor, action=action.value, pipeline=plan.pipeline)
        await self._check_lock(plan.pipeline, actor)
        expiry = approval_expiry(plan, rule, self.s.policy)
        if expiry is None:
            return Started(await self._start(plan, actor, request_id=request_id))
        return await self._request_approval(plan, data, actor, rule, request_id)

    async def _request_approval(
        self, plan: DeployPlan, data: PendingDeploy, actor: Actor, rule: Rule, request_id: str
    ) -> AwaitingApproval:
        """Post the request for a second person's approval in the channel (a break-glass one
        announced first), and keep it until decided or expired."""
        breaking = plan.break_glass is not None
        expiry = approval_expiry(plan, rule, self.s.policy) or BREAK_GLASS_EXPIRY
        if not approvers_of(plan, rule, self.s.policy):
            await self._audit(actor, "deploy", plan.pipeline, "refused", detail="no approvers")
            raise UserError(texts.refused(texts.no_agent_approvers(plan.pipeline, rule.name)))
        approval_id = request_id_for("approval", request_id)
        expires_at = time.time() + expiry
        await self.s.store.create_approval(approval_id, data, expires_at=expires_at)
        try:
            if breaking:
                await self._announce_break_glass(plan, actor, approval_id)
            ts = await self.s.outbox.post(
                actor.channel_id, approval_request(plan, approval_id), key=approval_id
            )
        except SlackDeliveryError as exc:
            if not exc.no_access:
                raise
            await self._audit(actor, "deploy", plan.pipeline, "failed", detail=exc.error)
            raise UserError(
                texts.approval_not_posted(plan.pipeline, not_in_channel_text(exc.error))
            ) from None
        await self.s.store.set_approval_message(approval_id, channel=actor.channel_id, ts=ts)
        if breaking:
            detail = break_glass_detail(plan)
            await self._audit(
                actor, "deploy", plan.pipeline, "break-glass requested", detail=detail
            )
        else:
            await self._audit(
                actor, "deploy", plan.pipeline, "approval requested", detail=plan_summary(plan)
            )
        return AwaitingApproval(approval_id)

    async def _break_glass(
        self, plan: DeployPlan, actor: Actor, rule: Rule, request_id: str
    ) -> AwaitingApproval:
        """A deploy through a freeze: straight to a second person's approval, shown in full."""
        refusal = plan_refusal(plan, request_id, request_id_for("approval", request_id))
        if refusal is not None:
            await self._forget(request_id)
            await self._audit(actor, "deploy", plan.pipeline, "refused", detail="too large to show")
            raise UserError(texts.refused(refusal))
        approval_id = request_id_for("approval", request_id)
        try:
            await self._one_break_glass(plan, actor, rule, approval_id)
            return await self._request_approval(
                plan, plan_data(plan, actor), actor, rule, request_id
            )
        except RedisError:
            await self._forget(request_id)
            await self._let_break_glass_go(plan, approval_id)
            raise UserError(TRACKING_DOWN) from None
        except UserError as exc:
            await self._forget(request_id)
            if not isinstance(exc, _AlreadyBreaking):
                await self._let_break_glass_go(plan, approval_id)
            raise

    async def _one_break_glass(
        self, plan: DeployPlan, actor: Actor, rule: Rule, approval_id: str
    ) -> None:
        """One open break-glass request per person and pipeline: a second `--break-glass`
        (typed again, or from another channel) while the first waits is refused, so that one
        emergency does not become two approvals and two deploys through the freeze."""
        store = self.s.store
        ttl = (approval_expiry(plan, rule, self.s.policy) or BREAK_GLASS_EXPIRY) + 60
        stale = None
        for _ in range(2):
            open_id = await store.claim_break_glass(
                plan.pipeline, plan.requester, approval_id, ttl=ttl, stale=stale
            )
            if open_id is None or open_id == approval_id:
                return
            waiting = await store.approval(open_id)
            if (
                waiting is not None
                and waiting.status is ApprovalStatus.PENDING
                and waiting.expires_at > time.time()
            ):
                await self._audit(
                    actor, "deploy", plan.pipeline, "refused", detail="break-glass: asked"
                )
                raise _AlreadyBreaking(
                    freeze_texts.break_glass_pending(plan.pipeline, waiting.channel)
                )
            stale = open_id  # decided or expired: it no longer counts
        raise UserError(TRACKING_DOWN)

    async def _let_break_glass_go(self, plan: DeployPlan, approval_id: str) -> None:
        with contextlib.suppress(RedisError):
            await self.s.store.release_break_glass(plan.pipeline, plan.requester, approval_id)

    async def _break_glass_freeze(
        self, request: DeployRequest, actor: Actor, rule: Rule, now: float
    ) -> Occurrence:
        """The freeze a break-glass deploy goes through at `now`; refused when nothing is
        frozen (no glass to break) or when nobody could approve it."""
        occurrence = self.s.policy.active_freeze(request.pipeline, now)
        if occurrence is None:
            raise UserError(freeze_texts.not_frozen(request.pipeline))
        named = self.s.policy.approvers(rule, requester=actor.user_id, break_glass=True)
        # A second person: naming only the requester (or the person an agent acts for) is
        # naming nobody, and would leave a request no one may approve.
        if not [
            p for p in named if p not in (actor.user_id, self.s.policy.acts_for(actor.user_id))
        ]:
            await self._audit(
                actor, "deploy", request.pipeline, "refused", detail="break-glass: no approvers"
            )
            raise UserError(freeze_texts.no_break_glass_approvers(request.pipeline))
        return occurrence

    async def _announce_break_glass(self, plan: DeployPlan, actor: Actor, approval_id: str) -> None:
        """Say in the channel that someone breaks the glass, and why, before the approval."""
        occurrence = self.s.policy.active_freeze(plan.pipeline, self.s.tuning.clock())
        text = freeze_texts.break_glass_announcement(
            plan.requester,
            plan.pipeline,
            plan.break_glass or "",
            view_of(occurrence) if occurrence else None,
            plan.approvers,
            asks=plan_kind(plan)[1],
        )
        await self.s.outbox.post(actor.channel_id, notice(text), key=f"{approval_id}:breakglass")

    async def abort(self, request_id: str, actor: Actor) -> None:
        """The requester dropped their own confirmation (the Cancel button)."""
        plan, _ = await self._own_request(request_id, actor, verb="cancel")
        await self._audit(actor, plan_action(plan).value, plan.pipeline, "dropped")

    async def _own_request(
        self, request_id: str, actor: Actor, *, verb: str
    ) -> tuple[DeployPlan, PendingDeploy]:
        """Use up a waiting confirmation, only when `actor` is the one who asked for it."""
        expired = UserError(texts.CONFIRMATION_GONE)
        try:
            data = await self.s.store.deploy_request(request_id)
            if data is None:
                raise expired
            plan = plan_from(data)
            if plan.requester != actor.user_id:
                what = "rebuild" if plan.rebuild_of is not None else "deploy"
                raise UserError(texts.only_requester(plan.requester, verb, what))
            if await self.s.store.take_deploy_request(request_id) is None:
                raise expired
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        return plan, data

    async def rebuild_as_deploy(
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
                    raise UsageError(texts.not_a_commit(ref.number))
            except UsageError as exc:
                raise UserError(texts.not_a_new_build(str(exc))) from None
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
            acts_for=self.s.policy.acts_for(actor.user_id),
        )
        if rule.promote_from:
            plan = await self._promotable(plan, rule, actor, dedup_key)
        plan = await self._describe(plan, pipeline, rule)
        request_id = request_id_for("rebuild", trigger)
        return await self._ask_first(plan, actor, request_id, claim=dedup_key)

    async def check_rebuild_promotion(
        self, ref: BuildRef, actor: Actor, rule: Rule, dedup_key: str
    ) -> None:
        """A plain rebuild on a `promote_from` pipeline deploys its original's commit again:
        refused like a deploy unless that commit passed a deployment of `promote_from`."""
        try:
            original = await self.s.buildkite.get_build(ref.pipeline, ref.number)
        except BuildkiteError as exc:
            raise await self._refused(exc, dedup_key, actor, "rebuild", ref) from None
        plan = DeployPlan(
            pipeline=ref.pipeline,
            branch=original.branch or "main",
            commit=original.commit or "HEAD",
            message="",
            env={},
            requester=actor.user_id,
        )
        await self._promotable(plan, rule, actor, dedup_key)


def github_repo(repository: str | None) -> str | None:
    """`owner/name` of a GitHub repository URL (https or ssh), else None."""
    if not repository:
        return None
    match = re.match(
        r"^(?:https://github\.com/|git@github\.com:)([\w.-]+/[\w.-]+?)(?:\.git)?/?$", repository
    )
    return match.group(1) if match else None


def approvers_of(plan: DeployPlan, rule: Rule, policy: Policy) -> list[str]:
    """Who may approve the plan (see Policy.approvers): the rule's approvers, or the admins for
    a break-glass deploy on a rule without any; never the person an agent acts for."""
    return policy.approvers(
        rule, requester=plan.requester, break_glass=plan.break_glass is not None
    )


def approval_expiry(plan: DeployPlan, rule: Rule, policy: Policy) -> int | None:
    """How long the plan's approval request stays open, or None when it needs none."""
    if plan.break_glass is not None and rule.approval is None:
        return BREAK_GLASS_EXPIRY
    return policy.approval_expiry(rule, requester=plan.requester)


def break_glass_detail(plan: DeployPlan) -> str:
    """A break-glass deploy as the audit trail keeps it: the reason, and the freeze."""
    return f"break-glass: {plan.break_glass} (freeze: {plan.freeze or '?'})"


def frozen_text(occurrence: Occurrence) -> str:
    """A freeze as a break-glass plan and its audit name it: its reason and window."""
    return f"{occurrence.freeze.reason} ({occurrence.freeze.window})"


def plan_verb(plan: DeployPlan) -> str:
    """What a plan does, as a freeze's refusal and the audit name it (see plan_kind)."""
    if plan.rebuild_of is not None:
        return "rebuild"
    if plan.rollback_of is not None:
        return "rollback"
    return "promote" if plan.promoted_from else "deploy"


def plan_action(plan: DeployPlan) -> Action:
    return Action.REBUILD if plan.rebuild_of is not None else Action.DEPLOY


def plan_data(plan: DeployPlan, actor: Actor) -> PendingDeploy:
    data = asdict(plan)
    data["approvers"] = list(plan.approvers)
    return PendingDeploy(plan=data, user_name=actor.user_name, channel_name=actor.channel_name)


def plan_from(request: PendingDeploy) -> DeployPlan:
    fields = {f.name for f in dataclass_fields(DeployPlan)}
    values = {k: v for k, v in request.plan.items() if k in fields}
    values["approvers"] = tuple(values.get("approvers") or ())
    values["env"] = dict(values.get("env") or {})
    return DeployPlan(**values)
