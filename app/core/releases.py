"""The release ledger's rules: which builds are deployments, recording them as they start and
end, what is live, what a rollback goes back to, and whether a commit may be promoted
(rebuilding the ledger from Buildkite is `app.core.ledger_rebuild`).

A deployment is a build the bot started (its meta_data carries `chatops_source`), or a build of
a pipeline and branch that a notification route marked `deploy: true` announces. The ledger is
kept in Redis (`app.storage.ledger`); Buildkite's builds stay its source of truth.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from redis.exceptions import RedisError

from app.core.policy import AGENT_PREFIX, Policy, Route
from app.core.policy.model import AGENT_NAME
from app.slack.render.deploys import DeployPlan
from app.storage.keys import PENDING_TTL
from app.storage.ledger import Deployment, Outcome, PipelineInfo, Source
from app.storage.records import TrackedBuild
from app.storage.store import Store
from buildkite.client import BuildkiteClient
from buildkite.client.builds import SOURCE_META_KEY, SOURCE_META_VALUE
from buildkite.errors import BuildkiteError
from buildkite.models import Build, BuildState, PipelineRef

log = logging.getLogger(__name__)

#: What the bot adds to a build's meta_data beside its request id and source.
REQUESTED_BY_META = "chatops_requested_by"
APPROVED_BY_META = "chatops_approved_by"
ROLLBACK_OF_META = "chatops_rollback_of"
PROMOTED_FROM_META = "chatops_promoted_from"

#: The ledger's fields read from meta_data that a Buildkite rebuild copies from its original.
COPIED_ON_REBUILD = frozenset({"requested_by", "approved_by", "rollback_of", "promoted_from"})

FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_PROMOTED = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}#[0-9]{1,9}$")
#: Who may be named as a deployment's requester: a Slack user, or an agent (`agent:<name>`).
_USER = re.compile(r"^(?:[UW][A-Z0-9]{2,20}|agent:[a-z0-9][a-z0-9_-]{0,62})$")
#: ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
_NUMBER = re.compile(r"[0-9]{1,9}")
_OUTCOMES = {
    BuildState.PASSED: Outcome.PASSED,
    BuildState.FAILED: Outcome.FAILED,
    BuildState.CANCELED: Outcome.CANCELED,
    BuildState.SKIPPED: Outcome.SKIPPED,
    BuildState.NOT_RUN: Outcome.NOT_RUN,
}


def release_meta(plan: DeployPlan) -> dict[str, str]:
    """The meta_data that marks a rollback or a promotion on the build it starts."""
    meta = {}
    if plan.rollback_of is not None:
        meta[ROLLBACK_OF_META] = str(plan.rollback_of)
    if plan.promoted_from:
        meta[PROMOTED_FROM_META] = plan.promoted_from
    return meta


def is_bot_build(build: Build) -> bool:
    return build.meta_data.get(SOURCE_META_KEY) == SOURCE_META_VALUE


def deploy_routes(policy: Policy, pipeline: str, branch: str | None) -> list[Route]:
    return [route for route in policy.routes_for(pipeline, branch) if route.deploy]


def _epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def _user(value: str | None) -> str | None:
    # Written by the bot, but read back from Buildkite: only a Slack user id is kept.
    return value if value and _USER.match(value) else None


def _requester(value: str | None) -> str | None:
    """Who asked: a Slack user id, or an agent's id (`agent:<name>`, as the policy names it)."""
    if value and value.startswith(AGENT_PREFIX):
        return value if AGENT_NAME.match(value.removeprefix(AGENT_PREFIX)) else None
    return _user(value)


def outcome_of(build: Build) -> Outcome:
    return _OUTCOMES.get(build.state, Outcome.RUNNING) if build.is_final else Outcome.RUNNING


def deployment_from(
    build: Build,
    pipeline: str,
    *,
    source: Source,
    requested_by: str | None = None,
    created_by_bot: bool = False,
    now: float | None = None,
) -> Deployment:
    """The ledger's entry for a build, as Buildkite describes it (meta_data read strictly).

    `requested_by` is who asked as the bot recorded it; without it, the build's meta_data's
    word is taken, marked unverified. The approver is the meta_data's word too, marked
    unverified unless `created_by_bot` (`build` is the bot's own create's answer)."""
    meta = build.meta_data
    recorded = _requester(requested_by)
    claimed = None if recorded else _requester(meta.get(REQUESTED_BY_META))
    rollback = meta.get(ROLLBACK_OF_META, "")
    promoted = meta.get(PROMOTED_FROM_META, "")
    approver = _user(meta.get(APPROVED_BY_META))
    outcome = outcome_of(build)
    finished = _epoch(build.finished_at)
    if outcome is not Outcome.RUNNING and finished is None:
        finished = int(time.time() if now is None else now)
    return Deployment(
        pipeline=pipeline,
        number=build.number,
        web_url=build.web_url,
        commit=(build.commit or "HEAD")[:64],
        branch=(build.branch or "")[:255],
        outcome=outcome,
        source=source,
        requested_by=recorded or claimed,
        requester_unverified=claimed is not None,
        approved_by=approver,
        approver_unverified=approver is not None and not created_by_bot,
        started_at=_epoch(build.started_at or build.created_at),
        finished_at=finished if outcome is not Outcome.RUNNING else None,
        rollback_of=int(rollback) if _NUMBER.fullmatch(rollback) else None,
        promoted_from=promoted if _PROMOTED.match(promoted) else None,
    )


def _recorded_requester(tracked: TrackedBuild) -> str | None:
    """Who asked for a build, as the bot recorded it when it started it (a route's message
    has no requester)."""
    return next((t.requester for t in tracked.targets if t.requester), None)


def info_of(pipeline: PipelineRef | None) -> PipelineInfo | None:
    if pipeline is None or (pipeline.repository is None and pipeline.default_branch is None):
        return None
    return PipelineInfo(repository=pipeline.repository, default_branch=pipeline.default_branch)


class LedgerRecorder:
    """Records deployments as they start (the bot's own) and end (any source), once each."""

    def __init__(self, policy: Policy, store: Store, buildkite: BuildkiteClient) -> None:
        self.policy = policy
        self.store = store
        self.buildkite = buildkite

    async def started(self, build: Build, pipeline: str, *, requested_by: str) -> None:
        """The bot just created this build: it is a deployment, running."""
        entry = deployment_from(
            build, pipeline, source=Source.BOT, requested_by=requested_by, created_by_bot=True
        )
        try:
            await self.store.record_deployment(entry, info=info_of(build.pipeline))
        except RedisError as exc:  # the final is recorded all the same, from the build itself
            log.warning("could not record %s #%s in the ledger: %s", pipeline, build.number, exc)

    async def on_final(self, tracked: TrackedBuild, build: Build) -> None:
        """A tracked build ended (a Notifier listener): record it if it is a deployment."""
        pipeline = tracked.pipeline
        if await self.ended(build, pipeline):
            return
        requester = _recorded_requester(tracked)
        if deploy_routes(self.policy, pipeline, build.branch):
            await self.store.record_deployment(
                deployment_from(build, pipeline, source=Source.ROUTE, requested_by=requester)
            )
            return
        if requester is None:
            return  # announced by a route that does not mark deployments
        # Started from Slack but not recorded at its start (a rebuild, or an adopted create):
        # only Buildkite's copy of the build says whether the bot's meta_data is on it.
        try:
            full = await self.buildkite.get_build(pipeline, build.number)
        except BuildkiteError as exc:
            log.warning("could not read %s #%s for the ledger: %s", pipeline, build.number, exc)
            return
        if is_bot_build(full):
            entry = deployment_from(full, pipeline, source=Source.BOT, requested_by=requester)
            if full.rebuilt_from is not None:  # its meta_data is its original's, copied
                copied = dict.fromkeys(COPIED_ON_REBUILD - {"requested_by"})
                entry = entry.model_copy(update=copied)
            await self.store.record_deployment(entry, info=info_of(full.pipeline))

    async def ended(self, build: Build, pipeline: str) -> bool:
        """Record the end of a deployment the ledger has; False when it has none."""
        known = await self.store.deployment(pipeline, build.number)
        if known is None:
            return False
        entry = known.model_copy(
            update={
                "outcome": outcome_of(build),
                "commit": (build.commit or known.commit)[:64],
                "started_at": _epoch(build.started_at) or known.started_at,
                "finished_at": _epoch(build.finished_at) or int(time.time()),
            }
        )
        await self.store.record_deployment(entry)
        return True

    async def on_route_build(self, build: Build, pipeline: str, ref: PipelineRef | None) -> None:
        """A webhook's final build of a pipeline and branch a `deploy: true` route covers."""
        if not build.is_final or not deploy_routes(self.policy, pipeline, build.branch):
            return
        source = Source.BOT if is_bot_build(build) else Source.ROUTE
        known = await self.store.deployment(pipeline, build.number)
        tracked = await self.store.find(pipeline, build.number)
        requester = _recorded_requester(tracked) if tracked is not None else None
        entry = deployment_from(build, pipeline, source=source, requested_by=requester)
        if build.rebuilt_from is not None:  # its meta_data is its original's, copied
            copied = COPIED_ON_REBUILD - ({"requested_by"} if requester else set())
            entry = entry.model_copy(update=dict.fromkeys(copied))
        if known is not None:  # recorded at its start, or by the tracker's final listener
            kept = known if known.requested_by and not entry.requested_by else entry
            if known.requested_by and not known.requester_unverified:
                kept = known  # the bot's own record of who asked
            entry = entry.model_copy(
                update={
                    "requested_by": kept.requested_by,
                    "requester_unverified": kept.requester_unverified,
                    "approved_by": known.approved_by or entry.approved_by,
                    "approver_unverified": (
                        known.approver_unverified
                        if known.approved_by
                        else entry.approver_unverified
                    ),
                    "source": known.source,
                }
            )
        await self.store.record_deployment(entry, info=info_of(ref))


# -- what is live, what a rollback goes back to ---------------------------------------------


def live_deployment(entries: Iterable[Deployment]) -> Deployment | None:
    """The deployment live now: the newest that passed (entries newest first)."""
    return next((entry for entry in entries if entry.passed), None)


def running_deployments(entries: Iterable[Deployment], *, now: float) -> list[Deployment]:
    """Deployments not final yet, started no longer ago than the tracker follows a build (a
    deploy may wait on a block step for weeks); an older one is no longer followed, so its end
    was never seen and it is not said to run."""
    return [
        entry
        for entry in entries
        if entry.outcome is Outcome.RUNNING and now - (entry.started_at or 0) < PENDING_TTL
    ]


@dataclass(frozen=True)
class RollbackTarget:
    live: Deployment
    target: Deployment


class NoRollback(Exception):
    """Nothing to roll back to; the text says why."""


def rollback_target(
    pipeline: str, entries: Sequence[Deployment], number: int | None
) -> RollbackTarget:
    """The live deployment and the one a rollback deploys again (entries newest first).

    Without `number`: the newest passed deployment before the live one of another commit.
    """
    live = live_deployment(entries)
    if live is None:
        raise NoRollback(
            f"`{pipeline}` has no passed deployment in the ledger, so nothing is live to roll "
            "back from. (After losing Redis, `python -m app ledger rebuild` restores it.)"
        )
    if number is not None:
        chosen = next((entry for entry in entries if entry.number == number), None)
        if chosen is None:
            raise NoRollback(f"#{number} is not a deployment of `{pipeline}` in the ledger.")
        if not chosen.passed:
            raise NoRollback(
                f"#{number} of `{pipeline}` {chosen.outcome.value.replace('_', ' ')}: only a "
                "passed deployment can be rolled back to."
            )
        if chosen.number == live.number:
            raise NoRollback(f"#{number} is what is live on `{pipeline}` now.")
        return RollbackTarget(live=live, target=chosen)
    # A deployment recorded as HEAD says nothing of what it built: never gone back to by itself.
    older = [
        e
        for e in entries
        if e.number < live.number and e.passed and e.commit not in (live.commit, "HEAD")
    ]
    if not older:
        raise NoRollback(
            f"Nothing to roll back to: #{live.number} is the only passed deployment of "
            f"`{pipeline}` (of another commit than the live one) in the ledger."
        )
    return RollbackTarget(live=live, target=older[0])


# -- promotion in order ---------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """The commit a promoted deploy builds, and the source deployment it passed (None: not)."""

    commit: str | None
    passed: Deployment | None


async def check_promotion(
    store: Store,
    buildkite: BuildkiteClient,
    policy: Policy,
    *,
    pipeline: str,
    source: str,
    branch: str,
    commit: str,
) -> Promotion:
    """Resolve `commit` (HEAD, a short or a full SHA) and find a passed deployment of it on
    `source`: in the ledger first, then (for a full SHA the ledger lacks) Buildkite, once."""
    entries = await store.deployments(source)
    sha = await _resolve(
        buildkite, entries, pipeline=pipeline, source=source, branch=branch, commit=commit
    )
    if sha is None:
        return Promotion(commit=None, passed=None)
    found = next((e for e in entries if e.passed and e.commit == sha), None)
    if found is not None:
        return Promotion(commit=sha, passed=found)
    try:
        async for build in buildkite.list_builds(
            pipeline=source, commit=sha, state=BuildState.PASSED, exclude_jobs=True, limit=20
        ):
            bot = is_bot_build(build)
            if build.is_final and (bot or deploy_routes(policy, source, build.branch)):
                entry = deployment_from(build, source, source=Source.BOT if bot else Source.ROUTE)
                await store.record_deployment(entry, info=info_of(build.pipeline))
                return Promotion(commit=sha, passed=entry)
    except BuildkiteError as exc:
        log.info("could not look for %s on %s: %s", sha, source, exc)
    return Promotion(commit=sha, passed=None)


async def _resolve(
    buildkite: BuildkiteClient,
    entries: Sequence[Deployment],
    *,
    pipeline: str,
    source: str,
    branch: str,
    commit: str,
) -> str | None:
    """A full SHA for what was typed: HEAD is the branch's newest build's commit (on the
    pipeline deployed, else on `source`), as a protected deploy's confirmation resolves it;
    a short SHA must name one commit deployed on `source`."""
    typed = commit.lower()
    if FULL_SHA.match(typed):
        return typed
    if commit != "HEAD":
        matches = {e.commit for e in entries if e.commit.startswith(typed)}
        return matches.pop() if len(matches) == 1 else None
    for slug in (pipeline, source):
        try:
            async for build in buildkite.list_builds(
                pipeline=slug, branch=branch, exclude_jobs=True, limit=1
            ):
                sha = (build.commit or "").lower()
                if FULL_SHA.match(sha):
                    return sha
        except BuildkiteError as exc:
            log.info("could not resolve HEAD of %s on %s: %s", branch, slug, exc)
    return None
