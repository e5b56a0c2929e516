"""Models of the organization's other resources: pipelines, agents and clusters, and the
organization, user and access token that a health check reads."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, ValidationError, field_validator

from buildkite.models.builds import Job
from buildkite.models.common import ApiModel, Timestamp, fields_at_fault, item_id, none_if_empty

log = logging.getLogger(__name__)


class Pipeline(ApiModel):
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


class Agent(ApiModel):
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

    _empty = field_validator("job", mode="before")(none_if_empty)

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


class Organization(ApiModel):
    id: str
    slug: str
    name: str
    web_url: str | None = None


class User(ApiModel):
    id: str
    name: str
    email: str | None = None


class AccessToken(ApiModel):
    """What ``GET /v2/access-token`` says about the token in use."""

    uuid: str
    scopes: list[str] = Field(default_factory=list)
    description: str | None = None


class Cluster(ApiModel):
    """A cluster of the organization (``GET /organizations/{org}/clusters``)."""

    id: str
    name: str | None = None
