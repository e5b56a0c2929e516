"""The release ledger's commands: status and history (read from Redis only), and rollback and
promotion, which are deploys: they go through `Deploys` and so through the pipeline's policy,
lock, confirmation and approval exactly as a typed /deploy does."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from app.core.actions import Actions
from app.core.commands import COMMIT, DeployRequest, UsageError, check_branch
from app.core.commands.releases import HistoryRequest, PromoteRequest, RollbackRequest
from app.core.deploys import DeployOrigin, DeployOutcome, Deploys, github_repo
from app.core.errors import UserError, explain
from app.core.freezes import view_of
from app.core.policy import AGENT_PREFIX, Action
from app.core.releases import NoRollback, live_deployment, rollback_target, running_deployments
from app.slack.actor import Actor
from app.slack.render import releases as render
from app.slack.render import texts
from app.slack.render.releases import PipelineStatus
from app.slack.render.texts import TRACKING_DOWN
from app.storage.ledger import Deployment, PipelineInfo
from app.tracking.phases import FINAL_PHASES
from buildkite.errors import BuildkiteError

#: Deployments read per pipeline for its status: its live one is almost always among them.
STATUS_READ = 20
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


def _asked_by(actor: Actor) -> str:
    """Who asked, in a build's message: a person from Slack, or an agent over MCP."""
    if actor.user_id.startswith(AGENT_PREFIX):
        return f"by {actor.user_name} over MCP"
    return f"from Slack by @{actor.user_name}"


def _safe_ref(ref: str) -> bool:
    return bool(_REF.fullmatch(ref)) and ".." not in ref


def _check_deployed(branch: str, commit: str, number: int) -> None:
    """A branch and commit read back from Buildkite (or the ledger), to deploy again: checked
    like a typed /deploy, and the commit must be a SHA: `HEAD` would build whatever the branch
    is now, not what was deployed."""
    check_branch(branch)
    if commit == "HEAD" or not COMMIT.match(commit):
        raise UsageError(texts.not_a_commit(number))


@dataclass(frozen=True)
class ReleaseDeploy:
    """A rollback or a promotion asked for: what it deploys, and what became of it."""

    outcome: DeployOutcome
    #: What was live (rollback) or the source deployment (promotion), and what is deployed.
    live: Deployment
    target: Deployment | None
    diff_url: str | None


def compare_url(repository: str | None, base: str, head: str) -> str | None:
    """A GitHub compare link from `base` to `head` (commits or a branch), if on GitHub."""
    repo = github_repo(repository)
    if repo is None or base == head or not all(_safe_ref(ref) for ref in (base, head)):
        return None  # read from Buildkite: only a SHA or a plain branch name goes in a URL
    return f"https://github.com/{repo}/compare/{base}...{head}"


class Releases(Actions):
    """What is live where, what happened, and going back or forward from it."""

    async def status(
        self, pipeline: str | None, *, now: float | None = None
    ) -> list[PipelineStatus]:
        """Per pipeline (or every pipeline in the ledger): what is live and what runs now.

        Redis only: the ledger, its pipelines' repository and default branch, and the locks;
        and the policy's freezes in force.
        """
        # Freezes are read on the bot's clock (app.tuning), as the refusals are.
        frozen_at = self.s.tuning.clock() if now is None else now
        now = time.time() if now is None else now
        store = self.s.store
        try:
            pipelines = [pipeline] if pipeline else await store.ledger_pipelines(now=now)
            ledgers = await store.deployments_of(pipelines, limit=STATUS_READ)
            # Rarely, more failures in a row than were read: read those pipelines in full.
            deeper = [
                p for p, e in ledgers.items() if len(e) == STATUS_READ and not live_deployment(e)
            ]
            ledgers |= await store.deployments_of(deeper)
            infos = await store.pipeline_infos(pipelines)
            locks = (
                {lock.pipeline: lock for lock in await store.pipeline_locks()}
                if pipeline is None
                else {pipeline: lock}
                if (lock := await store.pipeline_lock(pipeline))
                else {}
            )
            followed = await self._followed(ledgers, now=now)
        except RedisError:
            raise UserError(render.LEDGER_DOWN) from None
        statuses = []
        for slug in pipelines:
            entries = ledgers.get(slug, [])
            live = live_deployment(entries)
            info = infos.get(slug, PipelineInfo())
            branch = info.default_branch
            # A 12-character SHA: GitHub's compare takes it, and 50 links fit one message.
            diff = (
                compare_url(info.repository, live.commit[:12], branch) if live and branch else None
            )
            frozen = self.s.policy.active_freeze(slug, frozen_at)
            statuses.append(
                PipelineStatus(
                    pipeline=slug,
                    live=live,
                    compare_url=diff,
                    default_branch=branch,
                    running=[e for e in running_deployments(entries, now=now) if e in followed],
                    lock=locks.get(slug),
                    freeze=view_of(frozen) if frozen is not None else None,
                )
            )
        return statuses

    async def _followed(
        self, ledgers: Mapping[str, Sequence[Deployment]], *, now: float
    ) -> set[Deployment]:
        """The running deployments the tracker still follows, not yet ended: only those are
        running now. One not followed (its tracking lost with Redis and recorded again by
        `ledger rebuild`, or never started) would never be seen to end."""
        running = [e for entries in ledgers.values() for e in running_deployments(entries, now=now)]
        tracked = await asyncio.gather(
            *(self.s.store.find(entry.pipeline, entry.number) for entry in running)
        )
        return {
            entry
            for entry, build in zip(running, tracked, strict=True)
            if build is not None and build.phase not in FINAL_PHASES
        }

    async def history(self, request: HistoryRequest) -> list[Deployment]:
        try:
            return await self.s.store.deployments(request.pipeline, limit=request.count)
        except RedisError:
            raise UserError(render.LEDGER_DOWN) from None

    async def rollback(
        self, request: RollbackRequest, actor: Actor, *, trigger: str
    ) -> ReleaseDeploy:
        """Deploy again the commit (branch and env) of the passed deployment before the live
        one, or of build #N; the new build carries `chatops_rollback_of`."""
        pipeline = request.pipeline
        breaking = request.break_glass is not None
        await self._authorize(Action.DEPLOY, pipeline, actor, break_glass=breaking, what="rollback")
        try:
            entries = await self.s.store.deployments(pipeline)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        try:
            chosen = rollback_target(pipeline, entries, request.to)
        except NoRollback as exc:
            await self._audit(
                actor, "rollback", pipeline, "refused", number=request.to, detail=str(exc)
            )
            raise UserError(render.no_rollback(str(exc))) from None
        live, target = chosen.live, chosen.target
        try:
            original = await self.s.buildkite.get_build(pipeline, target.number)
            repository = (await self.s.buildkite.get_pipeline(pipeline)).repository
        except BuildkiteError as exc:
            raise UserError(
                explain(exc, action="roll back", pipeline=pipeline, number=target.number)
            ) from None
        commit = original.commit or target.commit
        branch = original.branch or target.branch
        try:
            _check_deployed(branch, commit, target.number)
        except UsageError as exc:
            raise UserError(render.no_rollback(str(exc))) from None
        diff = compare_url(repository, live.commit, commit)
        deploy = DeployRequest(
            pipeline=pipeline,
            branch=branch,
            commit=commit,
            message=(f"Rollback of #{live.number} to #{target.number} {_asked_by(actor)}"),
            env={str(k): str(v) for k, v in (original.env or {}).items()},
            break_glass=request.break_glass,
        )
        origin = DeployOrigin(rollback_of=live.number, rollback_from=live.commit, diff_url=diff)
        outcome = await Deploys(self.s).deploy(deploy, actor, trigger=trigger, origin=origin)
        return ReleaseDeploy(outcome=outcome, live=live, target=target, diff_url=diff)

    async def promote(
        self, request: PromoteRequest, actor: Actor, *, trigger: str
    ) -> ReleaseDeploy:
        """Deploy to the pipeline the commit live now on its rule's `promote_from` pipeline."""
        pipeline = request.pipeline
        breaking = request.break_glass is not None
        rule = await self._authorize(
            Action.DEPLOY, pipeline, actor, break_glass=breaking, what="promote"
        )
        source = rule.promote_from
        if source is None:
            raise UserError(render.no_promote_rule(pipeline, rule.name))
        try:
            live = live_deployment(await self.s.store.deployments(source))
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if live is None:
            await self._audit(
                actor, "promote", pipeline, "refused", detail=f"nothing live on {source}"
            )
            raise UserError(render.nothing_live_on(source, pipeline))
        try:
            _check_deployed(live.branch or "main", live.commit, live.number)
        except UsageError as exc:
            raise UserError(render.no_promotion(str(exc))) from None
        deploy = DeployRequest(
            pipeline=pipeline,
            branch=live.branch or None,
            commit=live.commit,
            message=(f"Promote {source} #{live.number} ({live.commit[:12]}) {_asked_by(actor)}"),
            break_glass=request.break_glass,
        )
        origin = DeployOrigin(promoted_from=f"{source}#{live.number}")
        outcome = await Deploys(self.s).deploy(deploy, actor, trigger=trigger, origin=origin)
        return ReleaseDeploy(outcome=outcome, live=live, target=None, diff_url=None)
