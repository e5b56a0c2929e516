"""The `/buildkite` service: what it reads (see listings) and what admins change there.

Pipeline changes are for admins; stopping agents for admins and the policy's
`agent_stoppers`. Every change is audited, allowed or refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from redis.exceptions import RedisError

from app.core.commands.admin import PipelineSpec
from app.core.errors import UserError, about_cluster, explain
from app.core.listings import Listings
from app.core.policy import principal_ref
from app.slack.actor import Actor
from app.slack.outbox import SlackDeliveryError
from app.slack.payloads import AgentButtonValue
from app.slack.render import texts
from app.slack.render.admin import pipeline_changed
from app.slack.render.common import Rendered
from app.slack.render.texts import NAME_A_CLUSTER, TRACKING_DOWN
from app.storage.keys import ACTION_TTL, REQUEST_TTL
from buildkite.errors import BuildkiteError, NotFound
from buildkite.models import Pipeline

log = logging.getLogger(__name__)


class Admin(Listings):
    """Reads and changes pipelines and agents for a Slack user, within the policy."""

    async def require_admin(self, actor: Actor, what: str, *, action: str, pipeline: str) -> None:
        """Refuse unless `actor` is an admin; with no admins configured, refuse and say how."""
        policy = self.s.policy
        if not policy.admins:
            await self._audit(actor, action, pipeline, "refused", detail="no admins configured")
            raise UserError(texts.no_admins(what, policy.source))
        if not await policy.is_admin(actor.user_id, self.s.directory.usergroup_members):
            await self._audit(actor, action, pipeline, "refused", detail="not an admin")
            who = ", ".join(principal_ref(p) for p in policy.admins)
            raise UserError(texts.only_admins(what, who))

    async def _require_agent_stopper(self, actor: Actor, action: str, detail: str) -> None:
        policy = self.s.policy
        stoppers = policy.data.agent_stoppers or []
        allowed = [*policy.admins, *stoppers]
        if not allowed:
            await self._audit(actor, action, "", "refused", detail=f"{detail}; nobody may")
            raise UserError(texts.no_agent_stoppers(policy.source))
        if actor.user_id not in await policy.members(allowed, self.s.directory.usergroup_members):
            await self._audit(actor, action, "", "refused", detail=detail)
            who = ", ".join(principal_ref(p) for p in allowed)
            raise UserError(texts.only_agent_stoppers(who))

    async def create_pipeline(
        self, spec: PipelineSpec, actor: Actor, *, request_id: str
    ) -> tuple[Pipeline, bool]:
        """Create a pipeline (once per request) and say so in the channel.

        Returns the pipeline, and whether the channel was told.
        """
        await self.require_admin(
            actor, "create pipelines", action="pipeline create", pipeline=spec.name
        )
        await self._claim(request_id, actor.user_id, REQUEST_TTL)
        extra = {
            key: value
            for key, value in (
                ("default_branch", spec.default_branch),
                ("description", spec.description),
            )
            if value
        }
        try:
            cluster_id = await self._cluster_for(spec)
        except UserError:
            await self._release(request_id)
            raise
        try:
            pipeline = await self.bk.create_pipeline(
                name=spec.name,
                repository=spec.repository,
                configuration=spec.steps,
                cluster_id=cluster_id,
                **extra,
            )
        except BuildkiteError as exc:
            await self._release(request_id)
            if cluster_id is None and about_cluster(exc):
                await self._audit(actor, "pipeline create", spec.name, "failed", detail=str(exc))
                raise UserError(NAME_A_CLUSTER.format(name=spec.name)) from None
            await self._audit(actor, "pipeline create", spec.name, "failed", detail=str(exc))
            raise UserError(self._explain_change(exc, "create", spec.name)) from None
        detail = f"from the template `{spec.template}`" if spec.template else ""
        await self._audit(actor, "pipeline create", pipeline.slug, "created", detail=detail)
        told = await self._announce(
            actor.channel_id,
            pipeline_changed(actor.user_id, "created", pipeline.slug, pipeline.web_url, detail),
        )
        return pipeline, told

    async def _cluster_for(self, spec: PipelineSpec) -> str | None:
        """The cluster a new pipeline joins: its template's, else BUILDKITE_CLUSTER_ID, else
        the organization's only cluster; None on an organization without clusters."""
        settings = self.s.settings
        if spec.template and (chosen := settings.pipeline_template_clusters.get(spec.template)):
            return chosen
        if settings.buildkite_cluster_id:
            return settings.buildkite_cluster_id
        try:
            clusters = await self.bk.list_clusters()
        except BuildkiteError as exc:
            # Without read_clusters the bot cannot tell; Buildkite says so if one was needed.
            log.info("could not list the organization's clusters: %s", exc)
            return None
        if len(clusters) == 1:
            return clusters[0].id
        if clusters:
            raise UserError(NAME_A_CLUSTER.format(name=spec.name))
        return None

    async def pipeline_for_update(self, slug: str, actor: Actor) -> Pipeline:
        """The pipeline whose form an admin is about to open."""
        await self.require_admin(actor, "change pipelines", action="pipeline update", pipeline=slug)
        try:
            return await self.bk.get_pipeline(slug)
        except BuildkiteError as exc:
            raise UserError(explain(exc, action="read", pipeline=slug)) from None

    async def update_pipeline(
        self, slug: str, fields: Mapping[str, str], actor: Actor
    ) -> tuple[Pipeline, bool]:
        """Change a pipeline's description, default branch or repository."""
        await self.require_admin(actor, "change pipelines", action="pipeline update", pipeline=slug)
        if not fields:
            raise UserError(texts.NOTHING_TO_CHANGE)
        try:
            pipeline = await self.bk.update_pipeline(slug, **fields)
        except BuildkiteError as exc:
            await self._audit(actor, "pipeline update", slug, "failed", detail=str(exc))
            raise UserError(self._explain_change(exc, "update", slug)) from None
        changed = ", ".join(f"{key}={value}" for key, value in fields.items())
        await self._audit(actor, "pipeline update", slug, "updated", detail=changed)
        told = await self._announce(
            actor.channel_id,
            pipeline_changed(actor.user_id, "changed", slug, pipeline.web_url, f"({changed})"),
        )
        return pipeline, told

    async def pipeline_to_delete(self, slug: str, actor: Actor) -> Pipeline:
        """Check, before asking for confirmation, that the pipeline exists and may be deleted."""
        await self.require_admin(actor, "delete pipelines", action="pipeline delete", pipeline=slug)
        try:
            return await self.bk.get_pipeline(slug)
        except BuildkiteError as exc:
            raise UserError(explain(exc, action="read", pipeline=slug)) from None

    async def delete_pipeline(self, slug: str, actor: Actor) -> bool:
        """Delete a pipeline once its deletion was confirmed; says whether the channel was told."""
        await self.require_admin(actor, "delete pipelines", action="pipeline delete", pipeline=slug)
        request_id = f"pipeline-delete:{slug}"
        await self._claim(request_id, actor.user_id, ACTION_TTL)
        try:
            await self.bk.delete_pipeline(slug)
        except BuildkiteError as exc:
            await self._release(request_id)
            await self._audit(actor, "pipeline delete", slug, "failed", detail=str(exc))
            raise UserError(self._explain_change(exc, "delete", slug)) from None
        await self._audit(actor, "pipeline delete", slug, "deleted")
        return await self._announce(
            actor.channel_id, pipeline_changed(actor.user_id, "deleted", slug, None)
        )

    async def stop_agent(self, agent: AgentButtonValue, actor: Actor, *, force: bool) -> None:
        """Stop an agent: gracefully (its job finishes first), or by force (its job is canceled)."""
        action = "agent force stop" if force else "agent stop"
        detail = f"agent {agent.name} ({agent.id})"
        await self._require_agent_stopper(actor, action, detail)
        request_id = f"agent-stop:{agent.id}:{force}"
        await self._claim(request_id, actor.user_id, ACTION_TTL)
        try:
            await self.bk.stop_agent(agent.id, force=force)
        except BuildkiteError as exc:
            await self._release(request_id)
            await self._audit(actor, action, "", "failed", detail=f"{detail}: {exc}")
            if isinstance(exc, NotFound):
                raise UserError(texts.agent_gone(agent.name)) from None
            verb = "force-stop" if force else "stop"
            raise UserError(explain(exc, action=verb, pipeline=agent.name)) from None
        await self._audit(actor, action, "", "requested", detail=detail)

    async def _announce(self, channel: str, rendered: Rendered) -> bool:
        try:
            await self.s.outbox.post(channel, rendered)
        except SlackDeliveryError:
            return False
        return True

    async def _claim(self, request_id: str, user_id: str, ttl: int) -> None:
        try:
            first = await self.s.store.claim_request(request_id, user_id, ttl=ttl)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if first is not None:
            raise UserError(texts.already_asked_admin(first, user_id))

    async def _release(self, request_id: str) -> None:
        with contextlib.suppress(RedisError):
            await self.s.store.release_request(request_id)

    async def _audit(
        self, actor: Actor, action: str, pipeline: str, outcome: str, *, detail: str = ""
    ) -> None:
        await self.s.auditor.record(
            user=actor.user_id,
            action=action,
            pipeline=pipeline,
            channel=actor.channel_id,
            outcome=outcome,
            detail=detail,
        )

    @staticmethod
    def _explain_change(exc: BuildkiteError, verb: str, pipeline: str) -> str:
        return explain(exc, action=f"{verb} the pipeline", pipeline=pipeline)
