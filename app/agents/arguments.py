"""The tools' arguments: strict pydantic models, whose JSON schemas (with a description for
every argument) are the tools' input schemas."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.commands import COMMIT, UsageError, check_branch
from app.core.names import PIPELINE_SLUG_PATTERN
from app.core.policy import MAX_ENV_VARS

MAX_MESSAGE = 1000
MAX_FIELDS = 98
MAX_FIELD_VALUE = 4000


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


Pipeline = Field(
    pattern=PIPELINE_SLUG_PATTERN,
    description="The pipeline's slug, as in its Buildkite URL (e.g. deploy-prod).",
)
Number = Field(ge=1, le=10**9, description="The build's number in its pipeline.")
IdempotencyKey = Field(
    default=None,
    min_length=1,
    max_length=200,
    pattern=r"^[A-Za-z0-9._:/-]+$",
    description="Any string: the same call retried with the same key is done once and returns "
    "the first result. Without one, a call's identity is its arguments within the minute.",
)


def _valid_branch(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_branch(value)
    except UsageError:
        raise ValueError("not a valid branch name (see git check-ref-format)") from None


class DeployArgs(Args):
    pipeline: str = Pipeline
    branch: str | None = Field(
        default=None, max_length=255, description="The branch (default: the pipeline's)."
    )
    commit: str | None = Field(
        default=None, description="HEAD (default) or a commit SHA of 7 to 40 hex characters."
    )
    message: str | None = Field(
        default=None, max_length=MAX_MESSAGE, description="The build's message."
    )
    env: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_ENV_VARS,
        description="Environment variables for the build (NAME: value); the policy may forbid "
        "some names.",
    )
    idempotency_key: str | None = IdempotencyKey

    _branch = field_validator("branch")(_valid_branch)

    @field_validator("commit")
    @classmethod
    def _commit(cls, value: str | None) -> str | None:
        if value is not None and not COMMIT.match(value):
            raise ValueError("use HEAD or a commit SHA of 7 to 40 hex characters")
        return value


class BuildArgs(Args):
    pipeline: str = Pipeline
    number: int = Number
    idempotency_key: str | None = IdempotencyKey


class UnblockArgs(BuildArgs):
    fields: dict[str, str] | None = Field(
        default=None,
        max_length=MAX_FIELDS,
        description="The block step's fields (key: value; a multiple select's values one a "
        "line). The step's own form says which are required.",
    )


class GetBuildArgs(Args):
    pipeline: str = Pipeline
    number: int = Number


States = Literal[
    "running", "scheduled", "passed", "failing", "failed", "blocked", "canceled", "canceling"
]


class ListBuildsArgs(Args):
    pipeline: str | None = Field(
        default=None, pattern=PIPELINE_SLUG_PATTERN, description="Only this pipeline's builds."
    )
    state: States | None = Field(default=None, description="Only builds in this state.")
    branch: str | None = Field(default=None, max_length=255, description="Only this branch.")
    limit: int = Field(default=20, ge=1, le=50, description="How many, newest first (≤ 50).")

    _branch = field_validator("branch")(_valid_branch)


class ListPipelinesArgs(Args):
    filter: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,50}$",
        description="Only pipelines whose slug or name contains this.",
    )


class ListAgentsArgs(Args):
    queue: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="Only Buildkite agents of this queue.",
    )


class NoArgs(Args):
    pass


class HealthArgs(Args):
    pipeline: str | None = Field(
        default=None,
        pattern=r"^(all|[a-z0-9][a-z0-9-]{0,99})$",
        description="A pipeline's slug, or all (default).",
    )
    window: Literal["24h", "7d"] = Field(default="24h", description="The period: 24h or 7d.")


class Until(StrEnum):
    FINISHED = "finished"
    RUNNING = "running"
    BLOCKED = "blocked"


class WaitBuildArgs(Args):
    pipeline: str = Pipeline
    number: int = Number
    until: Until = Field(
        default=Until.FINISHED,
        description="finished (a final state), running (started or later) or blocked (waiting "
        "on a block step).",
    )
    timeout_seconds: float = Field(
        default=30, ge=0, le=50, description="How long to wait at most (≤ 50 s)."
    )


class RequestArgs(Args):
    request_id: str = Field(
        pattern=r"^[0-9a-f]{24}$", description="The request_id a deploy returned."
    )


class WaitRequestArgs(RequestArgs):
    timeout_seconds: float = Field(
        default=30, ge=0, le=50, description="How long to wait at most (≤ 50 s)."
    )


class PolicyAction(StrEnum):
    DEPLOY = "deploy"
    CANCEL = "cancel"
    REBUILD = "rebuild"
    RETRY = "retry"
    UNBLOCK = "unblock"
    ROLLBACK = "rollback"
    PROMOTE = "promote"


class CheckPolicyArgs(Args):
    action: PolicyAction = Field(
        description="deploy, cancel, rebuild, retry, unblock, rollback or promote (a rollback "
        "or a promotion is a deploy, of the commit the ledger says)."
    )
    pipeline: str = Pipeline
