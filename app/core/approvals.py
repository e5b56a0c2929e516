"""Approvals of protected deploys: an approver's decision, checked again as it takes effect,
and the expiry of those nobody decided.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.core.actions import Actions
from app.core.deploys import (
    approvers_of,
    break_glass_detail,
    frozen_text,
    plan_action,
    plan_from,
    plan_verb,
)
from app.core.errors import UserError, explain
from app.core.freezes import view_of
from app.slack.actor import Actor
from app.slack.outbox import SlackDeliveryError
from app.slack.render import freezes as freeze_texts
from app.slack.render import texts
from app.slack.render.common import notice
from app.slack.render.deploys import DeployPlan, approval_request
from app.slack.render.texts import TRACKING_DOWN
from app.storage.records import Approval, ApprovalDecision, ApprovalStatus, PendingDeploy
from buildkite.errors import BuildkiteError, NotFound
from buildkite.models import Build

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """Why a decision cannot take effect now: `text` for people, `detail` for the audit trail."""

    text: str
    detail: str
    #: Tell the requester too (in the approval's thread), not only the approver.
    tell: bool = False


class Approvals(Actions):
    """Approve, reject and expire the approval requests of protected deploys."""

    async def decide(self, approval_id: str, actor: Actor, *, approve: bool) -> Build | None:
        """An approver's click: the first valid decision wins; the requester cannot approve."""
        approval = await self.s.store.approval(approval_id)
        if approval is None:
            raise UserError(texts.APPROVAL_GONE)
        data = approval.request
        plan = plan_from(data)
        rule = self.s.policy.rule_for(plan.pipeline)
        action = "approve" if approve else "reject"
        # The person an agent acts for approving its request would be approving themselves.
        if approve and actor.user_id in (plan.requester, plan.acts_for):
            await self._audit(actor, action, plan.pipeline, "refused", detail="self-approval")
            if actor.user_id == plan.acts_for:
                raise UserError(texts.no_agent_self_approval(plan.approvers))
            raise UserError(texts.no_self_approval(plan.approvers))
        approvers = approvers_of(plan, rule, self.s.policy)
        allowed = actor.user_id in (
            plan.requester,
            plan.acts_for,
        ) or actor.user_id in await self.s.policy.members(
            approvers, self.s.directory.usergroup_members
        )
        if not allowed:
            await self._audit(actor, action, plan.pipeline, "refused", detail="not an approver")
            raise UserError(texts.only_approvers(plan.approvers, action))
        now = self.s.tuning.clock()
        refusal = await self._recheck(plan, data, approval, actor, now) if approve else None
        status = (
            ApprovalStatus.REJECTED
            if not approve
            else ApprovalStatus.REFUSED
            if refusal
            else ApprovalStatus.APPROVED
        )
        result = await self.s.store.decide_approval(
            approval_id, status=status, user=actor.user_id, now=time.time()
        )
        if result is ApprovalDecision.EXPIRED_NOW:
            await self._show_approval(approval, plan, "expired")
            await self._settle(approval_id)
        if result is not ApprovalDecision.DECIDED:
            state = result.status
            raise UserError(texts.already_decided(state))
        if refusal is not None:
            await self._settle(approval_id, problem=refusal.text)
            await self._audit(actor, action, plan.pipeline, "refused", detail=refusal.detail)
            await self._show_approval(
                approval, plan, "refused", decided_by=actor.user_id, reason=refusal.text
            )
            if refusal.tell:
                await self._tell_requester(approval_id, approval, plan, refusal.text)
            raise UserError(texts.approved_not_started(refusal.text))
        detail = break_glass_detail(plan) if plan.break_glass is not None else ""
        if approve and detail and self.s.policy.active_freeze(plan.pipeline, now) is None:
            detail += "; no freeze in force when approved: under the pipeline's usual policy"
        await self._audit(
            actor, action, plan.pipeline, "approved" if approve else "rejected", detail=detail
        )
        if not approve:
            await self._show_approval(approval, plan, "rejected", decided_by=actor.user_id)
            await self._settle(approval_id)
            return None
        requester = Actor(
            user_id=plan.requester,
            user_name=data.user_name or plan.requester,
            channel_id=approval.channel or actor.channel_id,
            channel_name=data.channel_name,
        )
        try:
            build = await self._start(
                plan,
                requester,
                request_id=approval_id,
                thread=approval.ts or None,
                approved_by=actor.user_id,
            )
        except UserError as exc:
            await self._show_approval(approval, plan, "approved", decided_by=actor.user_id)
            await self._settle(approval_id, problem=exc.text)
            raise
        await self._show_approval(approval, plan, "approved", decided_by=actor.user_id, build=build)
        await self._settle(approval_id, build=build)
        return build

    async def _settle(
        self, approval_id: str, *, build: Build | None = None, problem: str | None = None
    ) -> None:
        """Note what an approval led to, for whoever waits on it (an agent's wait_for_request)."""
        try:
            await self.s.store.settle_approval(
                approval_id, number=build.number if build else None, problem=problem
            )
        except RedisError as exc:
            log.warning("could not note the outcome of approval %s: %s", approval_id, exc)

    async def _recheck(
        self,
        plan: DeployPlan,
        data: PendingDeploy,
        approval: Approval,
        approver: Actor,
        now: float,
    ) -> Refusal | None:
        """Check again, as the approval takes effect, what was checked when it was asked for
        (`now`: the bot's clock, of freezes)."""
        action = plan_action(plan)
        channel = approval.channel or approver.channel_id
        decision = await self.s.policy.check(
            action,
            plan.pipeline,
            user=plan.requester,
            channel_id=channel,
            channel_name=data.channel_name,
            resolve=self.s.directory.usergroup_members,
        )
        if not decision.allowed:
            return Refusal(
                texts.no_longer_allowed(
                    plan.requester, action.value, plan.pipeline, channel, decision.rule
                ),
                f"rule {decision.rule}",
            )
        if plan.break_glass is None:
            frozen = self.s.policy.freeze_refusal(plan.pipeline, now, action=plan_verb(plan))
            if frozen is not None:
                return Refusal(frozen, "freeze")
        elif (changed := self._freeze_changed(plan, now)) is not None:
            return changed
        rule = self.s.policy.rule_for(plan.pipeline)
        env_refusal = rule.env_refusal(plan.env)
        if env_refusal is not None:
            return Refusal(env_refusal, f"env: rule {rule.name}")
        try:
            lock = await self.s.store.pipeline_lock(plan.pipeline)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if lock and lock.user not in (plan.requester, approver.user_id):
            return Refusal(
                texts.locked_reason(plan.pipeline, lock.user, lock.reason),
                f"locked by {lock.user}",
            )
        try:
            await self.s.buildkite.get_pipeline(plan.pipeline)
        except NotFound:
            return Refusal(texts.pipeline_gone(plan.pipeline), "pipeline gone")
        except BuildkiteError as exc:  # not a refusal: the approval stays open for a new click
            raise UserError(explain(exc, action="deploy", pipeline=plan.pipeline)) from None
        return None

    def _freeze_changed(self, plan: DeployPlan, now: float) -> Refusal | None:
        """A break-glass request is approved to go through the freeze occurrences in force when
        it was asked, and only those: any other in force now (another freeze, one that started
        on top of them, or a later occurrence of the same one) refuses it. No freeze any more
        lets it go on under the pipeline's usual policy, whose approvers (the rule's) are the
        break-glass ones when it has any: `decide` has checked them already, and a rule without
        any needs no approval at all."""
        asked_in = set(plan.freeze_keys or ())
        in_force = self.s.policy.freezes_in_force(plan.pipeline, now)
        other = next((o for o in in_force if o.key not in asked_in), None)
        if other is None:
            return None
        text = freeze_texts.break_glass_freeze_changed(
            plan.pipeline, plan.freeze or "?", view_of(other)
        )
        return Refusal(text, f"break-glass: another freeze ({frozen_text(other)})", tell=True)

    async def _tell_requester(
        self, approval_id: str, approval: Approval, plan: DeployPlan, why: str
    ) -> None:
        """Say in the approval's thread, to the requester, why their request ended."""
        if not approval.ts:
            return
        text = freeze_texts.break_glass_refused_notice(plan.requester, plan.pipeline, why)
        try:
            await self.s.outbox.post(
                approval.channel, notice(text), thread_ts=approval.ts, key=f"{approval_id}:ended"
            )
        except SlackDeliveryError as exc:
            log.warning("could not tell the requester of %s: %s", approval_id, exc.error)

    async def expire_approvals(self) -> int:
        """Mark approvals past their time as expired and say so on their messages."""
        expired = 0
        for approval_id in await self.s.store.due_approvals(time.time()):
            result = await self.s.store.decide_approval(
                approval_id, status=ApprovalStatus.EXPIRED, user="", now=time.time()
            )
            approval = await self.s.store.approval(approval_id)
            if result is ApprovalDecision.EXPIRED_NOW and approval is not None:
                await self._show_approval(approval, plan_from(approval.request), "expired")
                await self._settle(approval_id)
                expired += 1
        return expired

    async def _show_approval(
        self,
        approval: Approval,
        plan: DeployPlan,
        status: str,
        *,
        decided_by: str | None = None,
        build: Build | None = None,
        reason: str | None = None,
    ) -> None:
        if not approval.ts:
            return
        rendered = approval_request(
            plan, None, status=status, decided_by=decided_by, build=build, reason=reason
        )
        await self.s.outbox.update(approval.channel, approval.ts, rendered)
