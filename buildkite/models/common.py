"""What every Buildkite model shares: the lenient base model, Buildkite's two time formats,
the people on a build, and the helpers that name an unreadable item in a log line."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    model_validator,
)


class ApiModel(BaseModel):
    """Base of every model: unknown fields ignored, instances immutable."""

    model_config = ConfigDict(extra="ignore", frozen=True)


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


def none_if_empty(value: Any) -> Any:
    # Buildkite sends `{}` for an absent author or pull request.
    if isinstance(value, dict) and not value:
        return None
    return value


class Person(ApiModel):
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


class Author(ApiModel):
    """The author stamped on a build the bot creates (shown in Buildkite's UI)."""

    name: str
    email: str


def json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
