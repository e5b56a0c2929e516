"""Typed views of Buildkite REST API v2 resources: only the fields the bot uses.

Read generously: every model ignores unknown fields, and tolerates the empty objects
(``"author": {}``) and nulls that real responses contain, an author given as a bare email, build
states Buildkite added after this code, and both of Buildkite's time formats
(``2015-05-09T21:05:59.874Z`` and ``2021-06-01 08:23:35 UTC``). A time that cannot be read at
all is dropped (``None``) rather than failing the object around it.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

log = logging.getLogger(__name__)


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

_ISO_DATETIME: TypeAdapter[datetime] = TypeAdapter(datetime)
# Older objects and some docs examples: "2021-06-01 08:23:35 UTC".
_UTC_SUFFIX_RE = re.compile(r"(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}(?:\.\d+)?) UTC")


def _parse_time(value: Any) -> datetime | None:
    """Either of Buildkite's time formats; ``None`` for a time that cannot be read."""
    if value is None or value == "" or isinstance(value, datetime):
        return value or None
    if isinstance(value, str) and (match := _UTC_SUFFIX_RE.fullmatch(value.strip())):
        value = f"{match[1]}T{match[2]}Z"
    if not isinstance(value, str):
        return None  # a number would be read as a Unix time: not a shape Buildkite sends
    try:
        moment = _ISO_DATETIME.validate_python(value)
    except ValidationError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


#: A time from Buildkite, in either format it uses; unreadable times become ``None``.
Timestamp = Annotated[datetime | None, BeforeValidator(_parse_time)]


def item_id(item: Any) -> str:
    """The id of a raw list item, for a log line about it (never the item itself)."""
    value = item.get("id") if isinstance(item, dict) else None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return repr(str(value)[:64])
    return "(no id)"


def fields_at_fault(exc: ValidationError) -> str:
    """The fields a validation error is about, for a log line (no values)."""
    fields = sorted({".".join(map(str, error["loc"])) for error in exc.errors()})
    return ", ".join(fields) or "value"


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

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        # Builds created with an email author carry `"author": "someone@example.com"`.
        if isinstance(value, str):
            text = value.strip()
            return {"email": text} if "@" in text else {"name": text or None}
        return value


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
    broken_reason: str | None = None
    agent: JobAgent | None = None
    started_at: Timestamp = None
    finished_at: Timestamp = None

    _empty = field_validator("agent", mode="before")(_none_if_empty)

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
    created_at: Timestamp = None
    scheduled_at: Timestamp = None
    started_at: Timestamp = None
    finished_at: Timestamp = None
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

    @field_validator("meta_data", mode="before")
    @classmethod
    def _text_meta_data(cls, value: Any) -> Any:
        # Meta-data values are strings in Buildkite; a non-string one is shown as text.
        if isinstance(value, dict):
            return {
                str(key): v if isinstance(v, str) else _json_text(v) for key, v in value.items()
            }
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
    cluster_id: str | None = None
    archived_at: Timestamp = None
    provider: dict[str, Any] | None = None
    running_builds_count: int | None = None
    scheduled_builds_count: int | None = None
    #: The pipeline's YAML steps, as saved in Buildkite (often just a `pipeline upload`).
    configuration: str | None = None
    #: Step objects, for pipelines whose steps were defined in Buildkite's UI.
    steps: list[Any] | None = None

    @field_validator("steps", mode="before")
    @classmethod
    def _step_list(cls, value: Any) -> Any:
        return value if isinstance(value, list) else None

    @field_validator("configuration", mode="before")
    @classmethod
    def _configuration_text(cls, value: Any) -> Any:
        return value if isinstance(value, str) else None


class Agent(_Model):
    """A connected (or recently connected) Buildkite agent."""

    id: str
    name: str
    connection_state: str | None = None
    hostname: str | None = None
    version: str | None = None
    web_url: str | None = None
    #: Top-level on current agents; clustered agents have no ``queue=`` tag.
    queue_name: str | None = Field(default=None, alias="queue")
    meta_data: list[str] = Field(default_factory=list)
    job: Job | None = None
    last_job_finished_at: Timestamp = None
    created_at: Timestamp = None

    _empty = field_validator("job", mode="before")(_none_if_empty)

    @field_validator("job", mode="before")
    @classmethod
    def _readable_job(cls, value: Any) -> Any:
        # The running job only decorates the agent: one that cannot be read leaves it idle-looking
        # rather than hiding the agent.
        if isinstance(value, dict) and value:
            try:
                return Job.model_validate(value)
            except ValidationError as exc:
                log.warning(
                    "ignored the job of an agent: unreadable %s (job %s)",
                    fields_at_fault(exc),
                    item_id(value),
                )
                return None
        return value

    @field_validator("queue_name", mode="before")
    @classmethod
    def _text_queue(cls, value: Any) -> Any:
        return value if isinstance(value, str) and value else None

    @field_validator("meta_data", mode="before")
    @classmethod
    def _null_meta(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [tag for tag in value if isinstance(tag, str)]
        return value or []

    @property
    def queue(self) -> str:
        """The agent's queue: the top-level ``queue``, else its ``queue=...`` tag, else
        ``default``."""
        if self.queue_name:
            return self.queue_name
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


class Cluster(_Model):
    """A cluster of the organization (``GET /organizations/{org}/clusters``)."""

    id: str
    name: str | None = None


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class Author(_Model):
    """The author stamped on a build the bot creates (shown in Buildkite's UI)."""

    name: str
    email: str
