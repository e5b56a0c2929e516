"""Models of builds and their jobs, and the build states Buildkite reports."""

from __future__ import annotations

import logging
import re
from enum import StrEnum
from typing import Any

from pydantic import Field, ValidationError, field_validator

from buildkite.models.common import (
    ApiModel,
    Person,
    Timestamp,
    fields_at_fault,
    item_id,
    json_text,
    none_if_empty,
)

log = logging.getLogger(__name__)


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

    @classmethod
    def _missing_(cls, value: object) -> BuildState | None:
        # A state this code does not know (the docs list `waiting` and `waiting_failed`) is
        # kept as it came, as a member of its own that is never terminal.
        if not isinstance(value, str) or not _STATE_RE.fullmatch(value):
            return None
        member = _UNKNOWN_STATES.get(value)
        if member is None:
            member = str.__new__(cls, value)
            member._name_ = value.upper()
            member._value_ = value
            _UNKNOWN_STATES[value] = member
        return member

    @property
    def is_known(self) -> bool:
        """False for a state Buildkite sent that this code has no name for."""
        return self.value in _KNOWN_STATES

    @property
    def is_terminal(self) -> bool:
        """True for the states a build ends in (buildkite/cli's IsTerminal uses the same set).

        A build waiting on a block step keeps its last state with ``blocked: true``; use
        ``Build.is_final``, which accounts for that, to decide whether tracking is over.
        """
        return self in TERMINAL_STATES


_STATE_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_UNKNOWN_STATES: dict[str, BuildState] = {}
_KNOWN_STATES = frozenset(state.value for state in BuildState)
#: What the builds API's `state` filter takes: a build state, or `finished` (any final one).
STATE_FILTERS = _KNOWN_STATES | {"finished"}

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


#: Job states that failed the job (unless it soft-failed). ``broken`` (the step could not run:
#: its ``if:`` was false, or its branch did not match), ``skipped`` and ``canceled`` are not.
FAILED_JOB_STATES = frozenset(
    {"failed", "timed_out", "expired", "blocked_failed", "unblocked_failed", "waiting_failed"}
)


class JobAgent(ApiModel):
    id: str | None = None
    name: str | None = None
    web_url: str | None = None


class Job(ApiModel):
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
    broken_reason: str | None = None
    agent: JobAgent | None = None
    started_at: Timestamp = None
    finished_at: Timestamp = None

    _empty = field_validator("agent", mode="before")(none_if_empty)

    @property
    def display_name(self) -> str:
        return self.name or self.label or self.step_key or self.type

    @property
    def is_failed(self) -> bool:
        """A job that failed the build, as Buildkite means it: a failed state (``failed``,
        ``timed_out``, ``expired``, ``*_failed``), not soft-failed, and not since retried.

        ``broken`` (a step that could not run because of its configuration, like an ``if:``
        that was false), ``skipped`` and ``canceled`` are never failures.
        """
        return self.state in FAILED_JOB_STATES and not self.soft_failed and not self.retried

    @property
    def ran(self) -> bool:
        """The job ran on an agent, so it has a log worth reading."""
        return self.type == "script" and self.started_at is not None


class PipelineRef(ApiModel):
    """The pipeline summary embedded in a build."""

    id: str | None = None
    slug: str
    name: str | None = None
    web_url: str | None = None
    repository: str | None = None
    default_branch: str | None = None


class RebuiltFrom(ApiModel):
    id: str | None = None
    number: int | None = None
    url: str | None = None


class Build(ApiModel):
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
    created_at: Timestamp = None
    scheduled_at: Timestamp = None
    started_at: Timestamp = None
    finished_at: Timestamp = None
    meta_data: dict[str, str] = Field(default_factory=dict)
    env: dict[str, Any] = Field(default_factory=dict)
    jobs: list[Job] = Field(default_factory=list)
    pipeline: PipelineRef | None = None
    rebuilt_from: RebuiltFrom | None = None

    _empty = field_validator("author", "creator", "rebuilt_from", mode="before")(none_if_empty)

    @field_validator("meta_data", "env", mode="before")
    @classmethod
    def _null_to_empty(cls, value: Any) -> Any:
        return value or {}

    @field_validator("meta_data", mode="before")
    @classmethod
    def _text_meta_data(cls, value: Any) -> Any:
        # Meta-data values are strings in Buildkite; a non-string one is shown as text.
        if isinstance(value, dict):
            return {str(key): v if isinstance(v, str) else json_text(v) for key, v in value.items()}
        return value

    @field_validator("jobs", mode="before")
    @classmethod
    def _readable_jobs(cls, value: Any) -> Any:
        # One job that cannot be read must not hide the build: it is left out, once logged.
        if not isinstance(value, list):
            return value or []
        jobs: list[Any] = []
        for item in value:
            try:
                jobs.append(Job.model_validate(item))
            except ValidationError as exc:
                log.warning(
                    "left out job %s of a build: unreadable %s", item_id(item), fields_at_fault(exc)
                )
        return jobs

    @property
    def is_final(self) -> bool:
        """True once the build has ended: a terminal state and not waiting on a block step."""
        return self.state.is_terminal and not self.blocked

    @property
    def is_waiting_on_block(self) -> bool:
        return self.blocked or self.state is BuildState.BLOCKED

    @property
    def failed_jobs(self) -> list[Job]:
        """The jobs that failed this build (see ``Job.is_failed``), in the build's order."""
        return [job for job in self.jobs if job.is_failed]

    @property
    def log_tail_job(self) -> Job | None:
        """The first job that really failed and ran, whose log explains the failure."""
        return next((job for job in self.failed_jobs if job.ran), None)

    @property
    def pipeline_slug(self) -> str | None:
        return self.pipeline.slug if self.pipeline else None
