"""Pipeline locks (freezes) and the audit trail, as asked for by a Slack user."""

from __future__ import annotations

from app.core.actions import Actions
from app.core.commands import AuditRequest, LockRequest, UnlockRequest
from app.core.errors import UserError
from app.core.lock_hygiene import LockHygiene
from app.core.policy import Action
from app.slack.actor import Actor
from app.slack.render import texts
from app.slack.render.deploys import lock_announcement
from app.storage.records import AuditEntry

AUDIT_SHOWN = 15


class Locks(Actions):
    """Lock and unlock pipelines, and show the audit trail."""

    async def lock(self, request: LockRequest, actor: Actor) -> str:
        await self._authorize(Action.LOCK, request.pipeline, actor)
        holder = await self.s.store.lock_pipeline(
            request.pipeline,
            user=actor.user_id,
            reason=request.reason,
            ttl=request.ttl,
            now=self.s.tuning.clock(),
            channel=actor.channel_id,
        )
        if holder is not None and holder.user != actor.user_id:
            await self._audit(
                actor, "lock", request.pipeline, "refused", detail=f"held by {holder.user}"
            )
            raise UserError(texts.already_locked(request.pipeline, holder.user))
        await self._audit(actor, "lock", request.pipeline, "locked", detail=request.reason)
        until = f" for {_human(request.ttl)}" if request.ttl else " until unlocked"
        return lock_announcement(actor.user_id, request.pipeline, until, request.reason)

    async def unlock(self, request: UnlockRequest, actor: Actor) -> str:
        lock = await self.s.store.pipeline_lock(request.pipeline)
        if lock is None:
            raise UserError(texts.not_locked(request.pipeline))
        if lock.user != actor.user_id and not await self.s.policy.is_admin(
            actor.user_id, self.s.directory.usergroup_members
        ):
            await self._audit(
                actor, "unlock", request.pipeline, "refused", detail=f"held by {lock.user}"
            )
            raise UserError(texts.only_holder_unlocks(request.pipeline, lock.user))
        await self.s.store.unlock_pipeline(request.pipeline)
        await self._audit(actor, "unlock", request.pipeline, "unlocked")
        if lock.user != actor.user_id:
            hygiene = LockHygiene(self.s.policy, self.s.store, self.s.outbox, self.s.tuning.clock)
            await hygiene.lifted(lock, actor.user_id)
        return texts.unlocked(actor.user_id, request.pipeline)

    async def audit_entries(self, request: AuditRequest, actor: Actor) -> list[AuditEntry]:
        """The audit trail, for admins (everything) or a pipeline's deployers (that pipeline)."""
        resolve = self.s.directory.usergroup_members
        admin = await self.s.policy.is_admin(actor.user_id, resolve)
        open_policy = not self.s.policy.admins
        if not admin:
            if request.pipeline is None and not open_policy:
                raise UserError(texts.WHOLE_AUDIT_FOR_ADMINS)
            if request.pipeline is not None:
                rule = self.s.policy.rule_for(request.pipeline)
                allowed = rule.allowed(Action.DEPLOY)
                if allowed is not None and actor.user_id not in await self.s.policy.members(
                    allowed, resolve
                ):
                    raise UserError(texts.audit_for_deployers(request.pipeline))
        return await self.s.store.audit_entries(pipeline=request.pipeline, limit=AUDIT_SHOWN)


def _human(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
