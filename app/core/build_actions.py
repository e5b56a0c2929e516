"""What people do to a build that exists: cancel, rebuild, unblock, retry its failed jobs."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.core.actions import Actions
from app.core.commands import BuildRef
from app.core.deploys import Deploys, NeedsConfirmation, Started
from app.core.errors import UserError
from app.core.listings import Listings
from app.core.policy import Action
from app.core.services import Services, request_id_for
from app.core.supersede import superseded_refusal
from app.core.unblock_forms import BlockForm, form_in_pipeline
from app.slack.actor import Actor
from app.slack.mrkdwn import link
from app.slack.payloads import UnblockButtonValue
from app.slack.render import texts
from app.slack.render.builds import retried_reply, unblocked_reply
from app.storage.keys import ACTION_TTL
from buildkite.errors import BuildkiteError, BuildMaybeStarted, PermissionDenied, ValidationFailed
from buildkite.models import Build, Job

log = logging.getLogger(__name__)


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


class BuildActions(Actions):
    """Cancel, rebuild, unblock and retry, as requested by a Slack user."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        #: A protected rebuild is asked for like a deploy.
        self.deploys = Deploys(services)

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
                    title = link(current.web_url, f"{ref.pipeline} #{ref.number}")
                    raise UserError(texts.nothing_to_cancel(title, current.state.value)) from None
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

        On a pipeline whose rule asks first, a rebuild is a deploy: see `Deploys.rebuild_as_deploy`.
        `dedup_key` and `dedup_ttl` are as for `cancel`.
        """
        rule = await self._authorize(Action.REBUILD, ref.pipeline, actor, number=ref.number)
        await self._check_lock(ref.pipeline, actor)
        await self._claim(dedup_key, actor.user_id, ttl=dedup_ttl)
        if rule.asks_first:
            return await self.deploys.rebuild_as_deploy(ref, actor, rule, dedup_key, trigger)
        if rule.promote_from:
            await self.deploys.check_rebuild_promotion(ref, actor, rule, dedup_key)
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

    async def unblock_form(self, value: UnblockButtonValue, actor: Actor) -> UnblockTarget:
        """Check the unblock is allowed, and find the block step's form (see unblock_forms)."""
        await self._authorize(Action.UNBLOCK, value.pipeline, actor, number=value.number)
        ref = BuildRef(value.pipeline, value.number)
        await self._check_lock(value.pipeline, actor, action="unblock", build=ref)
        await self._check_superseded(value, actor)
        bk = self.s.buildkite
        build = await Listings(self.s).build(ref, action="unblock")
        job = next((j for j in build.jobs if j.id == value.job), None)
        if job is None or job.type != "manual":
            raise UserError(texts.STEP_GONE)
        if job.state != "blocked":
            raise UserError(texts.step_not_waiting(job.display_name, job.state))
        label = job.label or job.name
        problem = None
        try:
            pipeline = await bk.get_pipeline(value.pipeline)
        except BuildkiteError as exc:
            log.warning("could not read the steps of %s for an unblock: %s", value.pipeline, exc)
            scope = exc.missing_scope if isinstance(exc, PermissionDenied) else None
            problem = texts.steps_unreadable(scope)
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
        await self._check_superseded(value, actor)
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
            raise UserError(texts.unblocked_not_shown(label, not_posted))

    async def _check_superseded(self, value: UnblockButtonValue, actor: Actor) -> None:
        """Refuse to unblock a build a newer one of its branch superseded (see supersede)."""
        try:
            refusal = await superseded_refusal(
                self.s.store,
                self.s.policy,
                value.pipeline,
                value.number,
                confirmed=value.superseded_ok,
            )
        except RedisError:
            raise UserError(texts.TRACKING_DOWN) from None
        if refusal is None:
            return
        text, by = refusal
        await self._audit(
            actor,
            "unblock",
            value.pipeline,
            "refused",
            number=value.number,
            detail=f"superseded by #{by.number}",
        )
        raise UserError(text)

    async def retry_failed(
        self, ref: BuildRef, actor: Actor, *, thread: tuple[str, str | None], dedup_key: str
    ) -> list[Job]:
        """Retry a failed build's failed jobs (not a rebuild) and follow it again."""
        await self._authorize(Action.REBUILD, ref.pipeline, actor, number=ref.number, what="retry")
        await self._check_lock(ref.pipeline, actor, action="retry", build=ref)
        await self._claim(dedup_key, actor.user_id, ttl=ACTION_TTL)
        bk = self.s.buildkite
        try:
            build = await bk.get_build(ref.pipeline, ref.number)
            failed = build.failed_jobs
            if not failed:
                title = link(build.web_url, f"{ref.pipeline} #{ref.number}")
                raise UserError(texts.no_failed_jobs(title))
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
            raise UserError(texts.retrying_not_shown(title, not_posted))
        return failed

    async def _follow_again(self, fresh: Build, pipeline: str, actor: Actor) -> None:
        tracked = await self.s.store.get(fresh.id)
        if tracked is not None:
            await self.s.tracker.reopen(fresh)
        else:
            await self._track(fresh, pipeline, actor)
            await self.s.store.mark_retried(fresh.id)
