"""The release ledger's tools: `deployments` (what is live, what happened), and `rollback` and
`promote`, which go through `Releases` exactly as `/deploy rollback|promote` do, and so through
the pipeline's policy, freezes, lock, confirmation and approval (see app.core.release_actions)."""

from __future__ import annotations

import datetime as dt

from pydantic import Field

from app.agents.arguments import Args, IdempotencyKey, Pipeline
from app.agents.context import Context
from app.agents.tools.mutations import _mutation
from app.agents.views import NAME_LIMIT, MutationResult, View
from app.core.commands.releases import (
    MAX_HISTORY,
    HistoryRequest,
    PromoteRequest,
    RollbackRequest,
)
from app.core.deploys import Deploys, NeedsConfirmation
from app.core.release_actions import Releases
from app.core.services import request_id_for
from app.slack.render.freezes import FreezeView
from app.storage.ledger import Deployment

# -- arguments ---------------------------------------------------------------------------------


class DeploymentsArgs(Args):
    pipeline: str = Pipeline
    limit: int = Field(
        default=10,
        ge=1,
        le=MAX_HISTORY,
        description=f"How many deployments, newest first (≤ {MAX_HISTORY}).",
    )


class RollbackArgs(Args):
    pipeline: str = Pipeline
    to_build: int | None = Field(
        default=None,
        ge=1,
        le=10**9,
        description="The build number of a passed deployment to go back to (default: the "
        "passed deployment before the live one, of another commit).",
    )
    idempotency_key: str | None = IdempotencyKey


class PromoteArgs(Args):
    pipeline: str = Pipeline
    idempotency_key: str | None = IdempotencyKey


# -- results -----------------------------------------------------------------------------------


class DeploymentView(View):
    number: int = Field(description="The build's number in its pipeline.")
    web_url: str = Field(description="The build in Buildkite.")
    commit: str = Field(description="The commit deployed (a SHA).")
    branch: str = Field(description="The branch built.")
    outcome: str = Field(
        description="running, or how it ended: passed, failed, canceled, skipped, not_run."
    )
    source: str = Field(
        description="bot: started through the bot; route: announced by a notification route "
        "marked deploy."
    )
    requested_by: str | None = Field(
        default=None, description="Who asked for it (a Slack user id, or agent:<name>)."
    )
    requester_unverified: bool = Field(
        default=False,
        description="True when `requested_by` is only the build's meta_data's word (which any "
        "of its jobs can set): the bot has no record of its own of who asked.",
    )
    approved_by: str | None = Field(default=None, description="Who approved it (a Slack user id).")
    approver_unverified: bool = Field(
        default=False,
        description="True when `approved_by` is only the build's meta_data's word (which any of "
        "its jobs can set).",
    )
    started_at: str | None = Field(default=None, description="When it started (ISO 8601, UTC).")
    finished_at: str | None = Field(default=None, description="When it ended (ISO 8601, UTC).")
    duration_seconds: int | None = Field(default=None, description="From start to end.")
    rollback_of: int | None = Field(
        default=None, description="When a rollback: the live build it rolled back."
    )
    promoted_from: str | None = Field(
        default=None, description="When a promotion: `pipeline#number` whose commit it deployed."
    )


class FreezeInForce(View):
    reason: str = Field(description="The freeze's reason, as the policy says it.")
    window: str = Field(description="The freeze's window, as the policy says it.")
    ends_at: str = Field(description="When it ends (ISO 8601, UTC).")


class DeploymentsResult(View):
    pipeline: str = Field(description="The pipeline's slug.")
    live: DeploymentView | None = Field(
        default=None, description="What is live now: the newest passed deployment, if any."
    )
    running: list[DeploymentView] = Field(description="Deployments running now.")
    deployments: list[DeploymentView] = Field(
        description="The ledger's last deployments, newest first."
    )
    locked_by: str | None = Field(default=None, description="Who holds the pipeline's lock.")
    frozen: FreezeInForce | None = Field(
        default=None,
        description="The freeze in force: deploy, rebuild, rollback and promote are refused "
        "until it ends (agents have no break-glass).",
    )


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()


def _text(value: str | None) -> str | None:
    """Text the ledger copied from a build (who, a branch): one line, cut to size."""
    return plain_line(value) if value else None


def plain_line(value: str) -> str:
    return "".join(c for c in value if c.isprintable())[:NAME_LIMIT]


def deployment_view(entry: Deployment) -> DeploymentView:
    return DeploymentView(
        number=entry.number,
        web_url=entry.web_url,
        commit=plain_line(entry.commit),
        branch=plain_line(entry.branch),
        outcome=entry.outcome.value,
        source=entry.source.value,
        requested_by=_text(entry.requested_by),
        requester_unverified=bool(entry.requested_by and entry.requester_unverified),
        approved_by=_text(entry.approved_by),
        approver_unverified=bool(entry.approved_by and entry.approver_unverified),
        started_at=_iso(entry.started_at),
        finished_at=_iso(entry.finished_at),
        duration_seconds=entry.duration,
        rollback_of=entry.rollback_of,
        promoted_from=_text(entry.promoted_from),
    )


def freeze_in_force(view: FreezeView | None) -> FreezeInForce | None:
    if view is None:
        return None
    ends_at = _iso(view.end)
    assert ends_at is not None
    return FreezeInForce(reason=view.reason, window=view.window, ends_at=ends_at)


# -- the tools ---------------------------------------------------------------------------------


async def deployments(ctx: Context, args: DeploymentsArgs) -> DeploymentsResult:
    """The pipeline's deployment history from the bot's ledger, what is live and running now,
    its lock and any freeze in force (Redis only: no Buildkite request)."""
    releases = Releases(ctx.services)
    entries = await releases.history(HistoryRequest(args.pipeline, args.limit))
    (status,) = await releases.status(args.pipeline, now=ctx.services.tuning.clock())
    return DeploymentsResult(
        pipeline=args.pipeline,
        live=deployment_view(status.live) if status.live else None,
        running=[deployment_view(e) for e in status.running],
        deployments=[deployment_view(e) for e in entries],
        locked_by=status.lock.user if status.lock else None,
        frozen=freeze_in_force(status.freeze),
    )


async def rollback(ctx: Context, args: RollbackArgs) -> MutationResult:
    """Deploy again the commit of the passed deployment before the live one (or of build
    to_build), as /deploy rollback does; on a protected pipeline, a person approves it first."""
    actor = ctx.agent.actor(ctx.channel_for(args.pipeline))
    trigger = request_id_for("rollback", ctx.trigger)
    asked = await Releases(ctx.services).rollback(
        RollbackRequest(args.pipeline, args.to_build), actor, trigger=trigger
    )
    outcome = asked.outcome
    if isinstance(outcome, NeedsConfirmation):
        # An agent confirms nothing for itself: its plan goes to a person for approval.
        outcome = await Deploys(ctx.services).confirm(request_id_for("deploy", trigger), actor)
    return _mutation(ctx, args.pipeline, outcome)


async def promote(ctx: Context, args: PromoteArgs) -> MutationResult:
    """Deploy to the pipeline the commit live now on its rule's promote_from pipeline, as
    /deploy promote does; on a protected pipeline, a person approves it first."""
    actor = ctx.agent.actor(ctx.channel_for(args.pipeline))
    trigger = request_id_for("promote", ctx.trigger)
    asked = await Releases(ctx.services).promote(
        PromoteRequest(args.pipeline), actor, trigger=trigger
    )
    outcome = asked.outcome
    if isinstance(outcome, NeedsConfirmation):
        outcome = await Deploys(ctx.services).confirm(request_id_for("deploy", trigger), actor)
    return _mutation(ctx, args.pipeline, outcome)
