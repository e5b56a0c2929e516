"""What every mutation shares: claim, policy, lock and audit checks, and starting and
following a build (noted as awaited first, so that a lost answer is adopted by the poller).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping

from redis.exceptions import RedisError

from app.core.commands import BuildRef
from app.core.errors import UserError, explain
from app.core.freezes import FROZEN_ACTIONS, view_of
from app.core.policy import AGENT_PREFIX, Action, Rule
from app.core.releases import LedgerRecorder, release_meta
from app.core.services import Services
from app.slack.actor import Actor
from app.slack.mrkdwn import link
from app.slack.outbox import SlackDeliveryError, not_in_channel_text
from app.slack.render import freezes as freeze_texts
from app.slack.render import texts
from app.slack.render.common import Rendered
from app.slack.render.deploys import DeployPlan, plan_summary
from app.slack.render.texts import TRACKING_DOWN
from app.storage.keys import AWAITED_TTL, REQUEST_TTL
from app.storage.records import AwaitedBuild, MessageTarget
from buildkite.errors import BuildkiteError, BuildMaybeStarted
from buildkite.models import Build

log = logging.getLogger(__name__)


class Actions:
    """The checks and the plumbing the mutations share; each service below is one of them."""

    def __init__(self, services: Services) -> None:
        self.s = services

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
        self,
        action: Action,
        pipeline: str,
        actor: Actor,
        *,
        number: int | None = None,
        break_glass: bool = False,
        what: str | None = None,
    ) -> Rule:
        """The pipeline's rule, if `actor` may do `action` there now; a deploy or rebuild is
        also refused during a freeze, unless it asks to break the glass (approved after).

        `what` is the action as the freeze's refusal and its audit name it, when it is more
        than the policy's action: a rollback or a promote (deploys), a retry (a rebuild)."""
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
            raise UserError(texts.refused(decision.reason))
        if action in FROZEN_ACTIONS and not break_glass:
            await self._check_freeze(what or action.value, pipeline, actor, number=number)
        return self.s.policy.rule_for(pipeline)

    async def _check_freeze(
        self, action: str, pipeline: str, actor: Actor, *, number: int | None = None
    ) -> None:
        """Refuse (and audit) `action` on a frozen pipeline, naming the freeze and its end."""
        occurrence = self.s.policy.active_freeze(pipeline, self.s.tuning.clock())
        if occurrence is None:
            return
        reason = occurrence.freeze.reason
        await self._audit(
            actor, action, pipeline, "refused", number=number, detail=f"freeze: {reason}"
        )
        person = not actor.user_id.startswith(AGENT_PREFIX)  # an agent has no break-glass
        raise UserError(
            freeze_texts.frozen(pipeline, action, view_of(occurrence), break_glass=person)
        )

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
        if lock and lock.user != actor.user_id and build is not None:
            # Who asked for it, as the bot recorded it when it started the build: never the
            # build's meta-data, which any of its jobs (or whoever creates a build in
            # Buildkite) can set to the lock holder's id.
            try:
                tracked = await self.s.store.find(build.pipeline, build.number)
            except RedisError:
                raise UserError(TRACKING_DOWN) from None
            if tracked is not None and lock.user in {t.requester for t in tracked.targets}:
                return
        if lock and lock.user != actor.user_id:
            await self._audit(
                actor,
                action,
                pipeline,
                "refused",
                number=build.number if build else None,
                detail=f"locked by {lock.user}",
            )
            raise UserError(texts.locked(pipeline, lock.user, lock.reason))

    async def _claim(self, request_id: str, user_id: str, ttl: int = REQUEST_TTL) -> None:
        """Claim a request, or explain that it (or the same click by someone) is already handled."""
        try:
            first = await self.s.store.claim_request(request_id, user_id, ttl=ttl)
        except RedisError as exc:
            log.warning("redis unavailable while claiming a request: %s", exc)
            raise UserError(TRACKING_DOWN) from None
        if first is not None:
            raise UserError(texts.already_asked(first, user_id))

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
        raise UserError(texts.env_refused(refusal))

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
        meta.update(release_meta(plan))
        if plan.break_glass:
            meta["chatops_break_glass"] = plan.break_glass
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
        await self._audit(
            actor, "deploy", plan.pipeline, "started", build=build, detail=plan_summary(plan)
        )
        # In the ledger before it is followed, so that its end finds it there.
        await LedgerRecorder(self.s.policy, self.s.store, self.s.buildkite).started(
            build, plan.pipeline, requested_by=actor.user_id
        )
        await self._track(build, plan.pipeline, actor, thread=thread)
        await self._stop_awaiting(request_id)
        return build

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
            raise UserError(texts.started_untracked(title)) from None

    async def _observe(self, build: Build) -> None:
        try:
            await self.s.tracker.observe(build)
        except RedisError as exc:
            log.warning("could not record the new state of %s: %s", build.web_url, exc)

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
            followed = False
        else:
            followed = True
        what = f"the rebuild of #{number}" if number is not None else "the deploy"
        builds = f"https://buildkite.com/{self.s.buildkite.org}/{pipeline}/builds"
        return UserError(texts.maybe_started(what, pipeline, builds, followed=followed))

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
