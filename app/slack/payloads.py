"""What the bot's buttons carry in `value` and its modals in `private_metadata`: strict
pydantic models, validated again when Slack sends them back, and the one parser of each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.errors import UserError
from app.core.names import PIPELINE_SLUG_PATTERN

#: What a click on a button whose value no longer parses is answered.
STALE_BUTTON = "This button's data is not valid any more; nothing was done."

PipelineSlug = Annotated[str, Field(pattern=PIPELINE_SLUG_PATTERN)]
BuildNumber = Annotated[int, Field(gt=0, lt=10**9)]
JobId = Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")]
ChannelId = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,20}$")]
PageNumber = Annotated[int, Field(ge=1, le=1000)]


class Payload(BaseModel):
    """Exactly the fields the bot wrote: anything else is not a value it made."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Payload)


class RequestButtonValue(Payload):
    """What confirmation and approval buttons carry: the id of the request kept in Redis."""

    id: str = Field(pattern=r"^[0-9a-f]{16,64}$")


class BuildButtonValue(Payload):
    """What a build button carries in its `value`: validated again when clicked."""

    pipeline: PipelineSlug
    number: BuildNumber


class LockButtonValue(Payload):
    """The Unlock button of a person's lock in their App Home."""

    pipeline: PipelineSlug


class UnblockButtonValue(BuildButtonValue):
    """The Unblock button: which build and which block step (job)."""

    job: JobId
    #: The "Unblock anyway" of a superseded build, whose click Slack asked to confirm.
    superseded_ok: bool = False


class PipelinesPageValue(Payload):
    """The "More" button under a list of pipelines: which page, with which filter."""

    page: PageNumber
    filter: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,50}$")


class BuildsPageValue(Payload):
    """The "More" button under a list of builds (the branch is checked again when clicked)."""

    page: PageNumber
    pipeline: PipelineSlug | None = None
    state: str | None = Field(default=None, pattern=r"^[a-z_]{1,20}$")
    branch: str | None = Field(default=None, min_length=1, max_length=255)


class AgentsPageValue(Payload):
    """The "More" button under a list of agents."""

    page: PageNumber
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")


class AgentButtonValue(Payload):
    """An agent's Stop and Force stop buttons."""

    id: JobId
    name: str = Field(min_length=1, max_length=100)


class PipelineButtonValue(Payload):
    """The confirmation button of a pipeline deletion."""

    pipeline: PipelineSlug


class UnblockMetadata(Payload):
    """What the unblock modal carries in its private_metadata: validated again on submit."""

    pipeline: PipelineSlug
    number: BuildNumber
    job: JobId
    channel: ChannelId
    thread_ts: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    label: str = Field(default="the block step", max_length=200)
    superseded_ok: bool = False


class PipelineModalMetadata(Payload):
    """What the pipeline create/update modal carries in its private_metadata."""

    channel: ChannelId
    pipeline: PipelineSlug | None = None


def action_value(body: Mapping[str, Any], model: type[P]) -> P:
    """The clicked button's value, as the `model` it was written from.

    Raises UserError for a value the bot did not write (or wrote in an older shape).
    """
    try:
        return model.model_validate_json(body["actions"][0].get("value") or "")
    except (ValidationError, KeyError, IndexError):
        raise UserError(STALE_BUTTON) from None


def view_metadata(view: Mapping[str, Any], model: type[P]) -> P | None:
    """A submitted modal's private_metadata as the `model` it was written from, or None when
    the bot did not write it (the caller answers in the modal, so there is nothing to raise)."""
    try:
        return model.model_validate_json(view.get("private_metadata") or "")
    except ValidationError:
        return None
