"""What the fake Buildkite shares: Buildkite's constants, recorded requests, faults, routes and
signed webhooks. Part of the sandbox's and the tests' simulator of Buildkite.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from multidict import MultiDictProxy

JSON = dict[str, Any]

ALL_SCOPES = (
    "read_agents",
    "write_agents",
    "read_teams",
    "write_teams",
    "read_artifacts",
    "write_artifacts",
    "read_builds",
    "write_builds",
    "read_build_logs",
    "read_job_env",
    "read_organizations",
    "read_pipelines",
    "write_pipelines",
    "read_user",
    "read_clusters",
    "read_notification_services",
    "write_notification_services",
)

UNAUTHORIZED_MESSAGE = (
    "Authentication required. Please supply a valid API Access Token: "
    "https://buildkite.com/docs/apis/rest-api#authentication"
)
UNEXPECTED_STATUS = 599
# Resource URLs in bodies point at the real API, as Buildkite's do; only Link headers (which
# clients follow) point at the fake.
API_URL = "https://api.buildkite.com/v2"

BUILD_STATES = frozenset(
    {
        "creating",
        "scheduled",
        "running",
        "passed",
        "failing",
        "failed",
        "blocked",
        "canceling",
        "canceled",
        "skipped",
        "not_run",
    }
)
TERMINAL_STATES = frozenset({"passed", "failed", "canceled", "skipped", "not_run"})
# Buildkite's "finished" filter.
FINISHED_STATES = frozenset({"passed", "failed", "blocked", "canceled"})
CANCELABLE_STATES = frozenset({"creating", "scheduled", "running", "failing"})
RETRYABLE_JOB_STATES = frozenset({"failed", "timed_out", "canceled"})
UNFINISHED_JOB_STATES = frozenset(
    {"pending", "waiting", "blocked", "scheduled", "assigned", "accepted", "running", "limited"}
)

_BUILD_FILTERS = frozenset(
    {
        "state",
        "state[]",
        "branch",
        "branch[]",
        "commit",
        "commit[]",
        "created_from",
        "created_to",
        "finished_from",
        "creator",
        "include_retried_jobs",
        "exclude_jobs",
        "exclude_pipeline",
    }
)
_CREATE_BUILD_FIELDS = frozenset(
    {
        "commit",
        "branch",
        "message",
        "author",
        "env",
        "meta_data",
        "clean_checkout",
        "ignore_pipeline_branch_filters",
        "pull_request_base_branch",
        "pull_request_id",
        "pull_request_labels",
        "pull_request_repository",
    }
)
_META_PARAM_RE = re.compile(r"meta_data\[(.+)\]")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str  # full path, e.g. /v2/organizations/acme/builds
    query: list[tuple[str, str]]
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    json: Any  # the parsed JSON body, or None

    @property
    def api_path(self) -> str:
        """The path below ``/v2``, e.g. ``/organizations/acme/builds``."""
        return self.path.removeprefix("/v2")

    def param(self, name: str) -> str | None:
        """The first value of a query parameter."""
        return next((value for key, value in self.query if key == name), None)

    def params(self, name: str) -> list[str]:
        """Every value of a (repeated) query parameter, in order."""
        return [value for key, value in self.query if key == name]


@dataclass
class _Fault:
    kind: Literal["fail", "rate_limit", "delay", "drop"]
    remaining: int
    path_contains: str | None = None
    method: str | None = None
    status: int = 500
    body: str | None = None
    seconds: float = 0.0
    reset: int = 1
    scope: Literal["rest", "rest_user"] = "rest"
    how: Literal["cut", "delay", "fail"] = "cut"

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
        )


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[[_Call], web.StreamResponse]
    scope: str | None
    query: frozenset[str] = frozenset()
    meta_data_filters: bool = False


@dataclass
class _Call:
    request: web.Request
    args: dict[str, str]
    query: MultiDictProxy[str]
    json: Any


class _Reply(Exception):
    """Raised by a handler to answer with an error."""

    def __init__(self, status: int, message: str, errors: list[JSON] | None = None) -> None:
        super().__init__(message)
        body: JSON = {"message": message}
        if errors is not None:
            body["errors"] = errors
        self.response = web.json_response(body, status=status)


class _Unexpected(Exception):
    """A request the fake does not expect: it is answered with 599 and recorded."""


def _now_iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _Unexpected(f"malformed ISO 8601 time {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _stored_time(value: str) -> datetime:
    """A time as Buildkite stores it: ISO 8601, or the older ``2021-06-01 08:23:35 UTC``."""
    if value.endswith(" UTC"):
        value = value[: -len(" UTC")].replace(" ", "T") + "Z"
    return _parse_time(value)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "step"


def sign_webhook(
    body: bytes, token: str, timestamp: int | None = None, *, event: str | None = None
) -> dict[str, str]:
    """Headers Buildkite sends in signature mode: ``X-Buildkite-Signature`` (and the event)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(token.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    headers = {"X-Buildkite-Signature": f"timestamp={timestamp},signature={digest.hexdigest()}"}
    if event is not None:
        headers["X-Buildkite-Event"] = event
    return headers


def token_webhook_headers(token: str, *, event: str | None = None) -> dict[str, str]:
    """Headers Buildkite sends in token mode: ``X-Buildkite-Token`` (and the event)."""
    headers = {"X-Buildkite-Token": token}
    if event is not None:
        headers["X-Buildkite-Event"] = event
    return headers


def webhook_event_for(build: Mapping[str, Any]) -> str:
    """The build.* event Buildkite would send for a build in this state."""
    state = build["state"]
    if build.get("blocked") or state in {"passed", "failed", "canceled", "not_run", "blocked"}:
        return "build.finished"
    if state in {"creating", "scheduled"}:
        return "build.scheduled"
    if state == "failing":
        return "build.failing"
    if state == "skipped":
        return "build.skipped"
    return "build.running"
