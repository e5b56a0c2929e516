"""Typed views of Buildkite REST API v2 resources: only the fields the bot uses.

Every model ignores unknown fields, and tolerates the empty objects (``"author": {}``) and
nulls that real responses contain, so a new field at Buildkite never breaks parsing.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class BuildState(StrEnum):
    """A build's state, as Buildkite reports it."""

    CREATING = "creating"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PASSED = "passed"
    FAILING = "failing"
    FAILED = "failed"
    BLOCKED = "blocked"
    CANCELING = "canceling"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    NOT_RUN = "not_run"

    @property
    def is_terminal(self) -> bool:
        """True for the states a build ends in (buildkite/cli's IsTerminal uses the same set).

        A build waiting on a block step keeps its last state with ``blocked: true``; use
        ``Build.is_final``, which accounts for that, to decide whether tracking is over.
        """
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        BuildState.PASSED,
        BuildState.FAILED,
        BuildState.CANCELED,
        BuildState.SKIPPED,
        BuildState.NOT_RUN,
    }
)

#: States a build can be in while it still needs following (used as ``state[]`` when polling).
ACTIVE_STATES = (
    BuildState.CREATING,
    BuildState.SCHEDULED,
    BuildState.RUNNING,
    BuildState.FAILING,
    BuildState.CANCELING,
    BuildState.BLOCKED,
)


def _none_if_empty(value: Any) -> Any:
    # Buildkite sends `{}` for an absent author or pull request.
    if isinstance(value, dict) and not value:
        return None
    return value


class Person(_Model):
    """A build's author or creator (Buildkite user or git author)."""

    id: str | None = None
    name: str | None = None
    email: str | None = None


class JobAgent(_Model):
    id: str | None = None
    name: str | None = None
    web_url: str | None = None


class Job(_Model):
    """One job of a build. Waiter jobs may carry only ``id`` and ``type``."""

    id: str
    type: str
    name: str | None = None
    label: str | None = None
    step_key: str | None = None
    state: str | None = None
    web_url: str | None = None
    log_url: str | None = None
    exit_status: int | None = None
    soft_failed: bool = False
    retried: bool = False
    retried_in_job_id: str | None = None
    retries_count: int | None = None
    unblock_url: str | None = None
    unblockable: bool | None = None
    fields: list[dict[str, Any]] | None = None
    agent: JobAgent | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    _empty = field_validator("agent", mode="before")(_none_if_empty)

    @property
    def display_name(self) -> str:
        return self.name or self.label or self.step_key or self.type

    @property
    def is_failed(self) -> bool:
        """A job that failed the build: failed or timed out and not soft-failed nor retried."""
        return (
            self.type == "script"
            and self.state in {"failed", "timed_out", "broken"}
            and not self.soft_failed
            and not self.retried
        )


class PipelineRef(_Model):
    """The pipeline summary embedded in a build."""

    id: str | None = None
    slug: str
    name: str | None = None
    web_url: str | None = None
    repository: str | None = None
    default_branch: str | None = None


class RebuiltFrom(_Model):
    id: str | None = None
    number: int | None = None
    url: str | None = None


class Build(_Model):
    """A Buildkite build."""

    id: str
    number: int
    state: BuildState
    blocked: bool = False
    url: str | None = None
    web_url: str
    message: str | None = None
    commit: str | None = None
    branch: str | None = None
    source: str | None = None
    cancel_reason: str | None = None
    author: Person | None = None
    creator: Person | None = None
    created_at: datetime | None = None
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    meta_data: dict[str, str] = Field(default_factory=dict)
    env: dict[str, Any] = Field(default_factory=dict)
    jobs: list[Job] = Field(default_factory=list)
    pipeline: PipelineRef | None = None
    rebuilt_from: RebuiltFrom | None = None

    _empty = field_validator("author", "creator", "rebuilt_from", mode="before")(_none_if_empty)

    @field_validator("meta_data", "env", mode="before")
    @classmethod
    def _null_to_empty(cls, value: Any) -> Any:
        return value or {}

    @field_validator("jobs", mode="before")
    @classmethod
    def _null_jobs(cls, value: Any) -> Any:
        return value or []

    @property
    def is_final(self) -> bool:
        """True once the build has ended: a terminal state and not waiting on a block step."""
        return self.state.is_terminal and not self.blocked

    @property
    def is_waiting_on_block(self) -> bool:
        return self.blocked or self.state is BuildState.BLOCKED

    @property
    def failed_jobs(self) -> list[Job]:
        return [job for job in self.jobs if job.is_failed]

    @property
    def pipeline_slug(self) -> str | None:
        return self.pipeline.slug if self.pipeline else None


class Pipeline(_Model):
    """A Buildkite pipeline."""

    id: str
    slug: str
    name: str
    web_url: str | None = None
    url: str | None = None
    repository: str | None = None
    default_branch: str | None = None
    description: str | None = None
    builds_url: str | None = None
    visibility: str | None = None
    archived_at: datetime | None = None
    provider: dict[str, Any] | None = None
    running_builds_count: int | None = None
    scheduled_builds_count: int | None = None


class Agent(_Model):
    """A connected (or recently connected) Buildkite agent."""

    id: str
    name: str
    connection_state: str | None = None
    hostname: str | None = None
    version: str | None = None
    web_url: str | None = None
    meta_data: list[str] = Field(default_factory=list)
    job: Job | None = None
    last_job_finished_at: datetime | None = None
    created_at: datetime | None = None

    _empty = field_validator("job", mode="before")(_none_if_empty)

    @field_validator("meta_data", mode="before")
    @classmethod
    def _null_meta(cls, value: Any) -> Any:
        return value or []

    @property
    def queue(self) -> str:
        """The agent's queue tag (``queue=...``), ``default`` when it has none."""
        for tag in self.meta_data:
            key, _, value = tag.partition("=")
            if key == "queue":
                return value
        return "default"

    @property
    def is_busy(self) -> bool:
        return self.job is not None


class Organization(_Model):
    id: str
    slug: str
    name: str
    web_url: str | None = None


class User(_Model):
    id: str
    name: str
    email: str | None = None


class AccessToken(_Model):
    """What ``GET /v2/access-token`` says about the token in use."""

    uuid: str
    scopes: list[str] = Field(default_factory=list)
    description: str | None = None


class Author(_Model):
    """The author stamped on a build the bot creates (shown in Buildkite's UI)."""

    name: str
    email: str
