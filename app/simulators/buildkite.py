"""A fake Buildkite REST API v2 on a real aiohttp server, for tests, benchmarks and the sandbox.

It is the sandbox's and the tests' simulator of Buildkite, shipped in the package.

It keeps pipelines, builds, jobs and agents in memory and answers like Buildkite does (bodies,
status codes, ``Link`` pagination, ``RateLimit-*`` headers, token scopes). It records every
request, injects faults on demand, and fails LOUDLY on anything it does not expect: such a request
gets a 599 and lands in ``unexpected``, which every test fixture asserts is empty.

    async with FakeBuildkite() as bk:
        bk.add_pipeline("deploy-prod")
        client = BuildkiteClient(bk.token, bk.org, base_url=bk.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fnmatch
import hashlib
import hmac
import json
import math
import re
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import unquote, urlencode

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict, MultiDictProxy

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


class FakeBuildkite:
    """An in-memory Buildkite organization served over real HTTP on a free loopback port."""

    def __init__(
        self,
        org: str = "acme",
        token: str = "bk-test-token",
        *,
        rate_limit: int = 200,
        user_rate_limit: int | None = None,
        latency: float = 0.0,
        webhook_token: str = "bk-webhook-token",
    ) -> None:
        self.org = org
        self.token = token
        self.webhook_token = webhook_token
        #: The token's scopes; remove one and the endpoints needing it answer 403.
        self.scopes: list[str] = list(ALL_SCOPES)
        #: Requests allowed per 60 s window before 429s (the organization's limit).
        self.rate_limit = rate_limit
        #: The token user's own limit per 60 s window (Buildkite's is 50); unset, it follows
        #: the organization's, so that only tests about it hit it first.
        self._user_rate_limit = user_rate_limit
        #: The organization's clusters; when there are any, creating a pipeline needs a
        #: ``cluster_id`` naming one of them, as on Buildkite.
        self.clusters: list[JSON] = []
        #: The fields of each manual job's block step, by job id. Like Buildkite's API, the fake
        #: never shows them on the job (neither REST nor GraphQL does): they are in the
        #: pipeline's ``configuration`` or ``steps``, or nowhere for an uploaded step. The
        #: unblock endpoint checks a submission against them.
        self._block_fields: dict[str, list[JSON]] = {}
        #: Seconds every request waits before it is answered.
        self.latency = latency
        #: The clock used for created_at and the like; tests may replace it.
        self.now: Callable[[], datetime] = lambda: datetime.now(UTC)

        self.organization: JSON = {
            "id": str(uuid.uuid4()),
            "graphql_id": f"org-{org}",
            "url": f"{API_URL}/organizations/{org}",
            "web_url": f"https://buildkite.com/{org}",
            "name": org.replace("-", " ").title(),
            "slug": org,
            "created_at": "2015-05-09T21:05:59.874Z",
        }
        self.user: JSON = {
            "id": str(uuid.uuid4()),
            "graphql_id": "user-graphql-id",
            "name": "ChatOps Bot",
            "email": "chatops-bot@example.com",
            "created_at": "2023-01-03T06:06:42.765Z",
        }
        self.token_uuid = str(uuid.uuid4())
        self.pipelines: dict[str, JSON] = {}
        #: Every build, oldest first. API answers list them newest first.
        self.builds: list[JSON] = []
        self.agents: dict[str, JSON] = {}
        #: Log text per job id; a job without one gets a generated log.
        self.job_logs: dict[str, str] = {}
        self.requests: list[RecordedRequest] = []
        #: Requests being answered right now, and the most there ever were at once.
        self.in_flight = 0
        self.most_in_flight = 0
        #: Descriptions of requests the fake did not expect. Tests assert this stays empty.
        self.unexpected: list[str] = []

        self._steps: dict[str, list[JSON]] = {}
        self._next_number: dict[str, int] = {}
        self._faults: list[_Fault] = []
        self._window_started = time.monotonic()
        self._window_count = 0
        self._routes = self._make_routes()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port: int | None = None

    @property
    def user_rate_limit(self) -> int:
        """The token user's limit per 60 s window (``RateLimit-User-Limit``)."""
        return self.rate_limit if self._user_rate_limit is None else self._user_rate_limit

    @user_rate_limit.setter
    def user_rate_limit(self, value: int | None) -> None:
        self._user_rate_limit = value

    # Lifecycle

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if self.port is None:
            raise RuntimeError("FakeBuildkite is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The API base URL to give the client: ``http://127.0.0.1:PORT/v2``."""
        return f"{self.origin}/v2"

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Stop serving; requests still waiting on a delay are answered at once."""
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # State set-up

    def add_pipeline(
        self,
        slug: str,
        *,
        default_branch: str = "main",
        repository: str | None = None,
        name: str | None = None,
        steps: Sequence[str] = ("Test", "Deploy"),
        block: str | None = None,
        block_fields: Sequence[JSON] | None = None,
        block_key: str | None = None,
        block_prompt: str | None = None,
        block_in: Literal["configuration", "group", "steps", "upload"] = "configuration",
    ) -> JSON:
        """Add a pipeline whose builds get one script job per ``steps`` name.

        ``block`` adds a block step with that label before the last step, with ``block_fields``
        as its fields in Buildkite's YAML syntax (``{"text": label, "key": ..., "required": ...}``
        or ``{"select": label, "key": ..., "multiple": ..., "options": [{"label", "value"}]}``).
        ``block_in`` says where the pipeline defines it, as GET pipeline shows it: its YAML
        ``configuration`` (at the top, or inside a ``group``), the ``steps`` of a pipeline defined
        in the UI (no YAML), or nowhere (``upload``: the YAML only runs
        ``buildkite-agent pipeline upload``, the step comes with the build). The unblock endpoint
        requires the required fields and answers 422 for a select value not among its options,
        as Buildkite does; the jobs never show the fields.
        """
        pipeline_url = f"{API_URL}/organizations/{self.org}/pipelines/{slug}"
        templates: list[JSON] = [{"type": "script", "name": step} for step in steps]
        yaml_steps: list[JSON] = [
            {"label": step, "command": f"make {_key(step)}"} for step in steps
        ]
        rest_steps: list[JSON] = [
            {"type": "script", "name": step, "command": f"make {_key(step)}"} for step in steps
        ]
        if block is not None:
            manual: JSON = {"type": "manual", "label": block, "fields": list(block_fields or [])}
            yaml_block: JSON = {"block": block}
            rest_block: JSON = {"type": "manual", "label": block}
            if block_key is not None:
                manual["key"] = yaml_block["key"] = rest_block["key"] = block_key
            if block_prompt is not None:
                yaml_block["prompt"] = rest_block["prompt"] = block_prompt
            if block_fields:
                yaml_block["fields"] = rest_block["fields"] = [dict(f) for f in block_fields]
            at = max(len(templates) - 1, 0)
            templates.insert(at, manual)
            yaml_steps.insert(
                at,
                {"group": "Release", "steps": [yaml_block]} if block_in == "group" else yaml_block,
            )
            rest_steps.insert(at, rest_block)
        configuration: str | None = yaml.safe_dump({"steps": yaml_steps}, sort_keys=False)
        if block_in == "upload":
            configuration = (
                'steps:\n  - label: ":pipeline: Upload"\n'
                "    command: buildkite-agent pipeline upload\n"
            )
        pipeline: JSON = {
            "id": str(uuid.uuid4()),
            "graphql_id": f"pipeline-{slug}",
            "url": pipeline_url,
            "web_url": f"https://buildkite.com/{self.org}/{slug}",
            "name": name or slug.replace("-", " ").title(),
            "description": None,
            "slug": slug,
            "repository": repository or f"git@github.com:{self.org}/{slug}.git",
            "cluster_id": None,
            "branch_configuration": None,
            "default_branch": default_branch,
            "skip_queued_branch_builds": False,
            "cancel_running_branch_builds": False,
            "allow_rebuilds": True,
            "provider": {"id": "github", "settings": {}},
            "builds_url": f"{pipeline_url}/builds",
            "badge_url": f"https://badge.buildkite.com/{slug}.svg",
            "created_at": _now_iso(self.now()),
            "archived_at": None,
            "env": None,
            "scheduled_builds_count": 0,
            "running_builds_count": 0,
            "visibility": "private",
            "tags": None,
            "configuration": None if block_in == "steps" else configuration,
            "steps": rest_steps if block_in == "steps" else [],
        }
        self.pipelines[slug] = pipeline
        self._steps[slug] = templates
        self._next_number.setdefault(slug, 1)
        return pipeline

    def add_agent(
        self,
        name: str,
        *,
        hostname: str | None = None,
        version: str = "3.87.0",
        queue: str = "default",
        meta_data: Sequence[str] = (),
        connection_state: str = "connected",
        cluster: str | None = None,
    ) -> JSON:
        """Add a connected agent in ``queue``: reported in the top-level ``queue`` field, and
        also as a ``queue=<queue>`` tag unless the agent is in a ``cluster`` (clustered agents
        have no such tag, and a cluster-scoped web URL)."""
        agent_id = str(uuid.uuid4())
        web_url = f"https://buildkite.com/organizations/{self.org}/agents/{agent_id}"
        tags = [*meta_data] if cluster else [f"queue={queue}", *meta_data]
        if cluster:
            web_url = (
                f"https://buildkite.com/organizations/{self.org}/clusters/{cluster}"
                f"/queues/{uuid.uuid5(uuid.NAMESPACE_URL, queue)}/agents/{agent_id}"
            )
        agent: JSON = {
            "id": agent_id,
            "graphql_id": f"agent-{name}",
            "url": f"{API_URL}/organizations/{self.org}/agents/{agent_id}",
            "web_url": web_url,
            "name": name,
            "connection_state": connection_state,
            "hostname": hostname or f"{name}.internal",
            "ip_address": "10.0.0.1",
            "user_agent": f"buildkite-agent/{version}",
            "version": version,
            "queue": queue,
            "creator": None,
            "created_at": _now_iso(self.now()),
            "job": None,
            "last_job_finished_at": None,
            "priority": 0,
            "meta_data": tags,
        }
        self.agents[agent_id] = agent
        return agent

    def add_cluster(self, name: str = "Default cluster", *, default_queue: str = "default") -> JSON:
        """Make the organization clustered (or add a cluster to it)."""
        cluster_id = str(uuid.uuid4())
        url = f"{API_URL}/organizations/{self.org}/clusters/{cluster_id}"
        cluster: JSON = {
            "id": cluster_id,
            "graphql_id": f"cluster-{cluster_id}",
            "default_queue_id": str(uuid.uuid5(uuid.NAMESPACE_URL, default_queue)),
            "name": name,
            "description": None,
            "emoji": None,
            "color": None,
            "url": url,
            "web_url": f"https://buildkite.com/organizations/{self.org}/clusters/{cluster_id}",
            "default_queue_url": f"{url}/queues/{default_queue}",
            "queues_url": f"{url}/queues",
            "created_at": _now_iso(self.now()),
            "created_by": self._creator(),
        }
        self.clusters.append(cluster)
        return cluster

    def add_build(
        self,
        slug: str,
        *,
        commit: str = "a" * 40,
        branch: str | None = None,
        message: str = "Seeded build",
        state: str = "scheduled",
        blocked: bool = False,
        failed_jobs: Sequence[str] = (),
        meta_data: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        created_at: datetime | None = None,
        author: JSON | str | None = None,
    ) -> JSON:
        """Put a build straight into state, without an HTTP request; returns its live dict.

        ``author`` may be a bare email string: Buildkite returns that for builds created with
        an email author."""
        pipeline = self._pipeline(slug)
        build = self._new_build(
            pipeline,
            commit=commit,
            branch=branch or pipeline["default_branch"],
            message=message,
            meta_data=dict(meta_data or {}),
            env=dict(env or {}),
            author={} if author is None else author,
            source="api",
            created_at=created_at,
        )
        if state != "scheduled" or blocked or failed_jobs:
            self.set_build_state(
                slug, build["number"], state, blocked=blocked, failed_jobs=failed_jobs
            )
        return build

    def build(self, slug: str, number: int) -> JSON:
        """The live dict of a build (KeyError if there is none)."""
        for build in self.builds:
            if build["pipeline"]["slug"] == slug and build["number"] == number:
                return build
        raise KeyError(f"no build {slug}#{number}")

    def builds_of(self, slug: str) -> list[JSON]:
        """The builds of one pipeline, oldest first."""
        return [build for build in self.builds if build["pipeline"]["slug"] == slug]

    def set_build_state(
        self,
        slug: str,
        number: int,
        state: str,
        *,
        blocked: bool = False,
        failed_jobs: Sequence[str] = (),
    ) -> JSON:
        """Move a build (and its jobs) to ``state``, as Buildkite would; returns a copy of it.

        Jobs named in ``failed_jobs`` fail with exit status 1. With ``blocked``, the jobs before
        the first pending block step finish, the block step becomes ``blocked`` and the build
        ``blocked: true`` (Buildkite keeps ``state`` as it is, usually ``passed``).
        """
        if state not in BUILD_STATES:
            raise ValueError(f"unknown build state {state!r}")
        if state == "blocked":
            # A build waiting on a block step keeps the state it had: `blocked` is a flag.
            state, blocked = ("failed" if failed_jobs else "passed"), True
        build = self.build(slug, number)
        names = {job.get("name") for job in build["jobs"]}
        if unknown := set(failed_jobs) - names:
            raise ValueError(f"no jobs named {sorted(unknown)} in {slug}#{number}")
        now = _now_iso(self.now())
        build["state"] = state
        build["blocked"] = blocked
        build["blocked_state"] = "blocked" if blocked else ""
        if state not in {"creating", "scheduled"} and build["started_at"] is None:
            build["started_at"] = now
        build["finished_at"] = now if state in TERMINAL_STATES or blocked else None

        reachable = self._reachable_jobs(build)
        for job in build["jobs"]:
            if job.get("retried") or job["id"] not in reachable:
                continue
            if job["type"] == "manual":
                if blocked and job["state"] != "unblocked":
                    job["state"], job["unblockable"] = "blocked", True
                continue
            if job["type"] != "script":
                continue
            if job.get("name") in failed_jobs:
                self._finish_job(job, "failed", 1, now)
            elif state in {"running", "failing", "canceling"} and job["state"] in {
                "scheduled",
                "waiting",
            }:
                job["state"], job["started_at"] = "running", job["started_at"] or now
            elif state in {"passed", "failed", "blocked"} and job["state"] in UNFINISHED_JOB_STATES:
                self._finish_job(job, "passed", 0, now)
            elif state in {"canceled", "skipped", "not_run"} and (
                job["state"] in UNFINISHED_JOB_STATES
            ):
                job["state"] = "canceled" if state == "canceled" else "skipped"
                job["finished_at"] = now
            elif state in {"creating", "scheduled"}:
                job["state"] = "scheduled"
        return self._build_json(build)

    def set_job_log(self, job_id: str, text: str) -> None:
        """Make a job's log say ``text``."""
        self.job_logs[job_id] = text

    def webhook_payload(self, slug: str, number: int, event: str | None = None) -> JSON:
        """The body of the build.* webhook for a build as it is now (no jobs, pipeline beside it).

        ``event`` defaults to the one its state implies (a blocked build is ``build.finished``).
        """
        build = self._build_json(self.build(slug, number))
        pipeline = build.pop("pipeline")
        build.pop("jobs")
        return {
            "event": event or webhook_event_for(build),
            "build": build,
            "pipeline": pipeline,
            "sender": {"id": self.user["id"], "name": self.user["name"]},
        }

    def job_webhook_payload(
        self, slug: str, number: int, job_id: str, event: str = "job.finished"
    ) -> JSON:
        """The body of a job.* webhook: the build payload plus the job."""
        payload = self.webhook_payload(slug, number, event)
        payload["job"] = self._job_json(self._job(self.build(slug, number), job_id))
        return payload

    async def send_webhook(
        self,
        url: str,
        payload: Mapping[str, Any],
        *,
        mode: Literal["token", "signature"] = "token",
        token: str | None = None,
        timestamp: int | None = None,
    ) -> tuple[int, str]:
        """POST a webhook to ``url`` as Buildkite would; returns the status and body text."""
        body = json.dumps(payload).encode()
        secret = token or self.webhook_token
        event = str(payload.get("event", "ping"))
        if mode == "signature":
            headers = sign_webhook(body, secret, timestamp, event=event)
        else:
            headers = token_webhook_headers(secret, event=event)
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = "Buildkite-Request"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers=headers) as response,
        ):
            return response.status, await response.text()

    # Fault injection

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        body: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (a JSON message, or ``body``)."""
        self._faults.append(
            _Fault("fail", n, path_contains, method and method.upper(), status=status, body=body)
        )

    def rate_limit_next(
        self,
        n: int = 1,
        reset: int = 1,
        *,
        path_contains: str | None = None,
        scope: Literal["rest", "rest_user"] = "rest",
    ) -> None:
        """Answer the next ``n`` requests with Buildkite's 429 for ``scope`` (the organization's
        limit, or the token user's), whose body and reset header say ``reset`` seconds."""
        self._faults.append(_Fault("rate_limit", n, path_contains, reset=reset, scope=scope))

    def delay_next(
        self,
        n: int,
        seconds: float,
        path_contains: str | None = None,
        *,
        method: str | None = None,
    ) -> None:
        """Hold the next ``n`` matching requests for ``seconds`` before handling them."""
        self._faults.append(
            _Fault("delay", n, path_contains, method and method.upper(), seconds=seconds)
        )

    def drop_response_next(
        self,
        n: int = 1,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        how: Literal["cut", "delay", "fail"] = "cut",
        seconds: float = 60.0,
        status: int = 502,
    ) -> None:
        """Handle the next ``n`` matching requests, then lose the response.

        ``how="cut"`` closes the connection unanswered; ``"delay"`` holds the answer ``seconds``
        (past the client's timeout); ``"fail"`` answers ``status`` instead (a proxy's 5xx).
        Either way the change has happened on the server.
        """
        fault = _Fault(
            "drop", n, path_contains, method and method.upper(), seconds=seconds, status=status
        )
        fault.how = how
        self._faults.append(fault)

    def drop_after_create_next(
        self, n: int = 1, *, how: Literal["cut", "delay"] = "cut", seconds: float = 60.0
    ) -> None:
        """Create the next ``n`` builds, then lose the HTTP responses (see drop_response_next)."""
        self.drop_response_next(n, "/builds", method="POST", how=how, seconds=seconds)

    def fail_after_create_next(self, n: int = 1, status: int = 502) -> None:
        """Create the next ``n`` builds, then answer ``status`` (a proxy's 5xx, say)."""
        fault = _Fault("drop", n, "/builds", "POST", status=status)
        fault.how = "fail"
        self._faults.append(fault)

    def answer_late_next(
        self,
        seconds: float,
        path_contains: str,
        *,
        method: str,
        visible_after: float | None = None,
        n: int = 1,
    ) -> None:
        """Take ``seconds`` to answer the next ``n`` matching requests, as a slow Buildkite does.

        The work is done (a build created, say, and listed from then on) ``visible_after``
        seconds in (by default: as it answers), whether or not the client is still waiting.
        """
        visible = seconds if visible_after is None else min(visible_after, seconds)
        if visible > 0:
            self.delay_next(n, visible, path_contains, method=method)
        if seconds > visible:
            self.drop_response_next(
                n, path_contains, method=method, how="delay", seconds=seconds - visible
            )

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults_left(self, kind: Literal["fail", "rate_limit", "delay", "drop"]) -> int:
        """How many injected faults of this kind no request has met yet."""
        return sum(fault.remaining for fault in self._faults if fault.kind == kind)

    # Recorded requests

    def requests_to(
        self, method: str | None = None, path_prefix: str = ""
    ) -> list[RecordedRequest]:
        """Recorded requests by method and path prefix (with or without the ``/v2``)."""
        return [
            request
            for request in self.requests
            if (method is None or request.method == method.upper())
            and (request.path.startswith(path_prefix) or request.api_path.startswith(path_prefix))
        ]

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    def clear_requests(self) -> None:
        self.requests.clear()

    # Dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._serve(request)
        finally:
            self.in_flight -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        method = request.method
        path = request.rel_url.raw_path
        query = list(request.rel_url.query.items())
        description = f"{method} {request.rel_url.raw_path_qs}"
        body: Any = None
        problem = None
        if raw:
            if not request.content_type.startswith("application/json"):
                problem = f"body sent as {request.content_type}, not application/json"
            else:
                try:
                    body = json.loads(raw)
                except ValueError:
                    problem = "body is not valid JSON"
        self.requests.append(
            RecordedRequest(method, path, query, CIMultiDict(request.headers), raw, body)
        )
        count, reset = self._count_request()

        route, args = self._route(method, path)
        response: web.StreamResponse
        try:
            if route is None or problem is not None:
                raise _Unexpected(problem or "no such endpoint")
            response = await self._answer(request, route, args, body, count, reset)
        except _Unexpected as exc:
            response = self._unexpected(f"{description}: {exc}")
        except Exception:
            response = self._unexpected(
                f"{description}: the fake crashed\n{traceback.format_exc()}"
            )
        if response.status != 429:  # a 429 carries its own numbers
            response.headers.update(self._rate_limit_headers(count, reset))
        # Only a request that did its work can lose its answer.
        if response.status < 300 and (drop := self._take("drop", method, path)):
            if drop.how == "cut":
                if request.transport is not None:
                    request.transport.close()
            elif drop.how == "fail":
                response = web.json_response({"message": "Bad Gateway"}, status=drop.status)
            else:
                await self._pause(drop.seconds)
        return response

    async def _answer(
        self,
        request: web.Request,
        route: _Route,
        args: dict[str, str],
        body: Any,
        count: int,
        reset: int,
    ) -> web.StreamResponse:
        method, path = request.method, request.rel_url.raw_path
        if self.latency:
            await self._pause(self.latency)
        if delay := self._take("delay", method, path):
            await self._pause(delay.seconds)
        if limited := self._take("rate_limit", method, path):
            return self._too_many_requests(limited.scope, None, limited.reset)
        if failure := self._take("fail", method, path):
            if failure.body is not None:
                return web.Response(status=failure.status, text=failure.body)
            return web.json_response({"message": "Internal Server Error"}, status=failure.status)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"message": UNAUTHORIZED_MESSAGE}, status=401)
        if count > self.rate_limit:
            return self._too_many_requests("rest", count, reset)
        if count > self.user_rate_limit:
            return self._too_many_requests("rest_user", count, reset)
        if route.scope is not None and route.scope not in self.scopes:
            message = f"Your access token doesn't have the {route.scope} scope"
            return web.json_response({"message": message}, status=403)
        for key in request.rel_url.query:
            meta_data_filter = route.meta_data_filters and _META_PARAM_RE.fullmatch(key)
            if key not in route.query and not meta_data_filter:
                raise _Unexpected(f"unknown query parameter {key!r}")
        call = _Call(request, args, request.rel_url.query, body)
        try:
            return route.handler(call)
        except _Reply as reply:
            return reply.response

    def _route(self, method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match and route.method == method:
                return route, {key: unquote(value) for key, value in match.groupdict().items()}
        return None, {}

    def _unexpected(self, description: str) -> web.Response:
        self.unexpected.append(description)
        return web.json_response(
            {"message": f"unexpected request to FakeBuildkite: {description}"},
            status=UNEXPECTED_STATUS,
        )

    def _take(self, kind: str, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.kind == kind and fault.matches(method, path):
                fault.remaining -= 1
                return fault
        return None

    async def _pause(self, seconds: float) -> None:
        # Wakes early when the fake stops, so a test never waits on a held request.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _count_request(self) -> tuple[int, int]:
        """This request's number in the current 60 s window, and the seconds left in it (one
        token is one user, so both scopes count the same requests)."""
        elapsed = time.monotonic() - self._window_started
        if elapsed >= 60:
            self._window_started, self._window_count, elapsed = time.monotonic(), 0, 0.0
        self._window_count += 1
        return self._window_count, max(math.ceil(60 - elapsed), 1)

    def _rate_limit_headers(self, count: int, reset: int) -> dict[str, str]:
        return {
            "RateLimit-Scope": "organization",
            "RateLimit-Limit": str(self.rate_limit),
            "RateLimit-Remaining": str(max(self.rate_limit - count, 0)),
            "RateLimit-Reset": str(reset),
            "RateLimit-User-Limit": str(self.user_rate_limit),
            "RateLimit-User-Remaining": str(max(self.user_rate_limit - count, 0)),
            "RateLimit-User-Reset": str(reset),
        }

    def _too_many_requests(
        self, scope: Literal["rest", "rest_user"], count: int | None, reset: int
    ) -> web.Response:
        """Buildkite's 429: the body names the scope exceeded; its headers show it used up."""
        limit = self.rate_limit if scope == "rest" else self.user_rate_limit
        body = {
            "message": (
                "You have exceeded your API rate limit. "
                f"Please wait {reset} seconds before making more requests."
            ),
            "scope": scope,
            "limit": limit,
            "current": count if count is not None else limit + 1,
            "reset": reset,
        }
        response = web.json_response(body, status=429)
        headers = self._rate_limit_headers(self._window_count, reset)
        # The scope exceeded shows nothing left, even for an injected 429.
        headers["RateLimit-Remaining" if scope == "rest" else "RateLimit-User-Remaining"] = "0"
        response.headers.update(headers)
        return response

    def _make_routes(self) -> list[_Route]:
        org = r"/v2/organizations/(?P<org>[^/]+)"
        pipeline = org + r"/pipelines/(?P<slug>[^/]+)"
        build = pipeline + r"/builds/(?P<number>[0-9]+)"
        job = build + r"/jobs/(?P<job>[^/]+)"
        agent = org + r"/agents/(?P<agent>[^/]+)"
        pages = frozenset({"page", "per_page"})
        builds = _BUILD_FILTERS | pages
        agents = pages | {"name", "hostname", "version"}
        none: frozenset[str] = frozenset()
        table: list[
            tuple[str, str, Callable[[_Call], web.StreamResponse], str | None, frozenset[str]]
        ]
        table = [
            ("GET", r"/v2/builds", self._list_builds, "read_builds", builds),
            ("GET", org + r"/builds", self._list_builds, "read_builds", builds),
            ("GET", pipeline + r"/builds", self._list_builds, "read_builds", builds),
            ("POST", pipeline + r"/builds", self._create_build, "write_builds", none),
            ("GET", build, self._get_build, "read_builds", frozenset({"include_retried_jobs"})),
            ("PUT", build + r"/cancel", self._cancel_build, "write_builds", none),
            ("PUT", build + r"/rebuild", self._rebuild_build, "write_builds", none),
            ("PUT", build + r"/retry_failed_jobs", self._retry_failed, "write_builds", none),
            ("PUT", job + r"/retry", self._retry_job, "write_builds", none),
            ("PUT", job + r"/unblock", self._unblock_job, "write_builds", none),
            ("GET", job + r"/log", self._job_log, "read_build_logs", none),
            ("GET", org + r"/pipelines", self._list_pipelines, "read_pipelines", pages),
            ("POST", org + r"/pipelines", self._create_pipeline, "write_pipelines", none),
            ("GET", pipeline, self._get_pipeline, "read_pipelines", none),
            ("PATCH", pipeline, self._update_pipeline, "write_pipelines", none),
            ("DELETE", pipeline, self._delete_pipeline, "write_pipelines", none),
            ("GET", org + r"/agents", self._list_agents, "read_agents", agents),
            ("GET", org + r"/clusters", self._list_clusters, "read_clusters", pages),
            ("GET", agent, self._get_agent, "read_agents", none),
            ("PUT", agent + r"/stop", self._stop_agent, "write_agents", none),
            ("GET", org, self._get_organization, "read_organizations", none),
            ("GET", r"/v2/user", self._get_user, "read_user", none),
            ("GET", r"/v2/access-token", self._get_access_token, None, none),
        ]
        return [
            _Route(method, re.compile(pattern), handler, scope, query, query is builds)
            for method, pattern, handler, scope, query in table
        ]

    # Handlers: builds

    def _list_builds(self, call: _Call) -> web.StreamResponse:
        self._check_org(call)
        builds = [
            build
            for build in self.builds
            if "slug" not in call.args or build["pipeline"]["slug"] == call.args["slug"]
        ]
        if "slug" in call.args:
            self._pipeline(call.args["slug"])
        q = call.query
        states = set(q.getall("state[]", [])) | set(q.getall("state", []))
        if unknown := states - BUILD_STATES - {"finished"}:
            raise _Unexpected(f"unknown state filter {sorted(unknown)}")
        if "finished" in states:
            states |= FINISHED_STATES
        branches = q.getall("branch[]", []) + q.getall("branch", [])
        commits = set(q.getall("commit[]", []) + q.getall("commit", []))
        meta = {
            match.group(1): value
            for key, value in q.items()
            if (match := _META_PARAM_RE.fullmatch(key))
        }
        created_from = _parse_time(q["created_from"]) if "created_from" in q else None
        created_to = _parse_time(q["created_to"]) if "created_to" in q else None
        finished_from = _parse_time(q["finished_from"]) if "finished_from" in q else None

        def wanted(build: JSON) -> bool:
            created = _stored_time(build["created_at"])
            finished = build["finished_at"] and _stored_time(build["finished_at"])
            return (
                (not states or build["state"] in states)
                and (not branches or any(fnmatch.fnmatchcase(build["branch"], b) for b in branches))
                and (not commits or build["commit"] in commits)
                and all(build["meta_data"].get(k) == v for k, v in meta.items())
                and (created_from is None or created >= created_from)
                and (created_to is None or created <= created_to)
                and (finished_from is None or (bool(finished) and finished >= finished_from))
            )

        # Newest first; builds created in the same millisecond by creation order.
        order = {id(build): index for index, build in enumerate(self.builds)}
        selected = sorted(
            (build for build in builds if wanted(build)),
            key=lambda build: (build["created_at"], order[id(build)]),
            reverse=True,
        )
        return self._paginated(
            call,
            [
                self._build_json(
                    build,
                    jobs=q.get("exclude_jobs") != "true",
                    pipeline=q.get("exclude_pipeline") != "true",
                    retried=q.get("include_retried_jobs") == "true",
                )
                for build in selected
            ],
        )

    def _create_build(self, call: _Call) -> web.StreamResponse:
        pipeline = self._pipeline_for(call)
        body = self._json_object(call, _CREATE_BUILD_FIELDS)
        missing = [name for name in ("commit", "branch") if not body.get(name)]
        if missing:
            errors = [{"field": name, "code": "missing"} for name in missing]
            raise _Reply(422, "Validation Failed", errors)
        for name in ("env", "meta_data"):
            value = body.get(name, {})
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise _Reply(422, "Validation Failed", [{"field": name, "code": "invalid"}])
        build = self._new_build(
            pipeline,
            commit=body["commit"],
            branch=body["branch"],
            message=body.get("message") or "",
            meta_data=body.get("meta_data", {}),
            env=body.get("env", {}),
            author=body.get("author") or {},
            source="api",
        )
        return web.json_response(self._build_json(build), status=201)

    def _get_build(self, call: _Call) -> web.StreamResponse:
        retried = call.query.get("include_retried_jobs") == "true"
        return web.json_response(self._build_json(self._build_for(call), retried=retried))

    def _cancel_build(self, call: _Call) -> web.StreamResponse:
        self._no_body(call)
        build = self._build_for(call)
        if build["state"] not in CANCELABLE_STATES:
            if build["state"] in TERMINAL_STATES or build["blocked"]:
                raise _Reply(422, "Build can't be canceled because it's already finished")
            raise _Reply(422, f"Build can't be canceled while it is {build['state']}")
        now = _now_iso(self.now())
        build.update(state="canceled", finished_at=now, cancel_reason="canceled via the API")
        for job in build["jobs"]:
            if job.get("state") in UNFINISHED_JOB_STATES:
                job["state"], job["finished_at"] = "canceled", now
        return web.json_response(self._build_json(build))

    def _rebuild_build(self, call: _Call) -> web.StreamResponse:
        self._no_body(call)
        original = self._build_for(call)
        build = self._new_build(
            self._pipeline(original["pipeline"]["slug"]),
            commit=original["commit"],
            branch=original["branch"],
            message=original["message"],
            meta_data=dict(original["meta_data"]),
            env=dict(original["env"]),
            author=copy.deepcopy(original["author"]),
            source="api",
        )
        build["rebuilt_from"] = {
            "id": original["id"],
            "number": original["number"],
            "url": original["url"],
        }
        return web.json_response(self._build_json(build))

    def _retry_failed(self, call: _Call) -> web.StreamResponse:
        self._no_body(call)
        build = self._build_for(call)
        for job in list(build["jobs"]):
            if (
                job["type"] == "script"
                and not job["retried"]
                and job["state"]
                in {
                    "failed",
                    "timed_out",
                }
            ):
                self._retry(build, job)
        return web.Response(status=202)

    def _retry_job(self, call: _Call) -> web.StreamResponse:
        self._no_body(call)
        build = self._build_for(call)
        job = self._job_for(call, build)
        if job["type"] != "script" or job.get("state") not in RETRYABLE_JOB_STATES:
            raise _Reply(400, "Only failed, timed out or canceled jobs can be retried")
        if job["retried"]:
            raise _Reply(400, "This job has already been retried")
        return web.json_response(self._retry(build, job))

    def _unblock_job(self, call: _Call) -> web.StreamResponse:
        build = self._build_for(call)
        job = self._job_for(call, build)
        body = self._json_object(call, frozenset({"fields", "unblocker"}))
        if job["type"] != "manual":
            raise _Reply(422, "This job isn't a block step and can't be unblocked")
        if job["state"] != "blocked":
            raise _Reply(422, "This job can't be unblocked because it isn't blocked")
        fields = body.get("fields") or {}
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise _Reply(422, "Validation Failed", [{"field": "fields", "code": "invalid"}])
        self._check_block_fields(self._block_fields.get(job["id"], []), fields)
        now = _now_iso(self.now())
        unblocker = body.get("unblocker")
        job.update(
            state="unblocked",
            unblockable=False,
            unblocked_at=now,
            unblocked_by={"id": unblocker} if unblocker else self._creator(),
        )
        # Block step fields become build meta-data, as in Buildkite.
        build["meta_data"].update({key: str(value) for key, value in fields.items()})
        build.update(state="running", blocked=False, blocked_state="", finished_at=None)
        reachable = self._reachable_jobs(build)
        for other in build["jobs"]:
            if other["id"] in reachable and other.get("state") == "waiting":
                other["state"] = "scheduled"
        return web.json_response(self._job_json(job))

    @staticmethod
    def _check_block_fields(specs: list[JSON], fields: Mapping[str, str]) -> None:
        """422 for a required field left out, or a select value not among its options (a
        ``multiple: true`` select's choices come one a line, as Buildkite keeps them)."""

        def flag(value: Any, default: bool) -> bool:
            return default if value is None else str(value).lower() == "true"

        for spec in specs:
            key = str(spec.get("key") or "")
            value = fields.get(key)
            if flag(spec.get("required"), True) and not value:
                raise _Reply(422, "Validation Failed", [{"field": key, "code": "missing"}])
            options = {str(o.get("value")) for o in spec.get("options") or []}
            chosen = value.split("\n") if value and flag(spec.get("multiple"), False) else [value]
            if "select" in spec and value and not set(chosen) <= options:
                raise _Reply(422, "Validation Failed", [{"field": key, "code": "invalid"}])

    def _job_log(self, call: _Call) -> web.StreamResponse:
        self._no_body(call)
        build = self._build_for(call)
        job = self._job_for(call, build)
        text = self.job_logs.get(job["id"])
        if text is None:
            text = self._default_log(job)
        data = text.encode()
        if "text/plain" not in call.request.headers.get("Accept", ""):
            return web.json_response(
                {"url": job["log_url"], "content": text, "size": len(data), "header_times": []}
            )
        range_header = call.request.headers.get("Range")
        if range_header is None:
            return web.Response(body=data, content_type="text/plain", charset="utf-8")
        match = re.fullmatch(r"bytes=-([0-9]+)", range_header)
        if not match:
            raise _Unexpected(f"unsupported Range {range_header!r}")
        start = max(len(data) - int(match.group(1)), 0)
        response = web.Response(
            status=206, body=data[start:], content_type="text/plain", charset="utf-8"
        )
        response.headers["Content-Range"] = f"bytes {start}-{max(len(data) - 1, 0)}/{len(data)}"
        return response

    # Handlers: pipelines, agents, organization

    def _list_pipelines(self, call: _Call) -> web.StreamResponse:
        self._check_org(call)
        return self._paginated(call, [copy.deepcopy(p) for p in self.pipelines.values()])

    def _create_pipeline(self, call: _Call) -> web.StreamResponse:
        self._check_org(call)
        body = self._json_object(call, None)
        missing = [name for name in ("name", "repository") if not body.get(name)]
        if missing:
            errors = [{"field": name, "code": "missing"} for name in missing]
            raise _Reply(422, "Validation Failed", errors)
        cluster_id = body.get("cluster_id")
        if self.clusters and not cluster_id:
            raise _Reply(422, "Validation Failed", [{"field": "cluster_id", "code": "missing"}])
        if cluster_id is not None and cluster_id not in {c["id"] for c in self.clusters}:
            raise _Reply(422, "Validation Failed", [{"field": "cluster_id", "code": "invalid"}])
        slug = _key(body["name"])
        if slug in self.pipelines:
            raise _Reply(422, "Validation Failed", [{"field": "name", "code": "already_exists"}])
        pipeline = self.add_pipeline(slug, name=body["name"], repository=body["repository"])
        extra = {key: value for key, value in body.items() if key not in {"name", "repository"}}
        pipeline.update(extra)
        return web.json_response(copy.deepcopy(pipeline), status=201)

    def _list_clusters(self, call: _Call) -> web.StreamResponse:
        self._check_org(call)
        return self._paginated(call, [copy.deepcopy(c) for c in self.clusters])

    def _get_pipeline(self, call: _Call) -> web.StreamResponse:
        return web.json_response(copy.deepcopy(self._pipeline_for(call)))

    def _update_pipeline(self, call: _Call) -> web.StreamResponse:
        pipeline = self._pipeline_for(call)
        body = self._json_object(call, None)
        for key in ("id", "slug", "url", "web_url", "builds_url", "created_at"):
            if key in body:
                raise _Reply(422, "Validation Failed", [{"field": key, "code": "read_only"}])
        pipeline.update(body)
        return web.json_response(copy.deepcopy(pipeline))

    def _delete_pipeline(self, call: _Call) -> web.StreamResponse:
        self._no_body(call)
        slug = self._pipeline_for(call)["slug"]
        del self.pipelines[slug]
        return web.Response(status=204)

    def _list_agents(self, call: _Call) -> web.StreamResponse:
        self._check_org(call)
        q = call.query
        agents = [
            copy.deepcopy(agent)
            for agent in self.agents.values()
            if all(agent[key] == q[key] for key in ("name", "hostname", "version") if key in q)
        ]
        return self._paginated(call, agents)

    def _get_agent(self, call: _Call) -> web.StreamResponse:
        return web.json_response(copy.deepcopy(self._agent_for(call)))

    def _stop_agent(self, call: _Call) -> web.StreamResponse:
        agent = self._agent_for(call)
        body = self._json_object(call, frozenset({"force"}))
        force = body.get("force", True)  # Buildkite's default
        if not isinstance(force, bool):
            raise _Reply(422, "Validation Failed", [{"field": "force", "code": "invalid"}])
        agent["stop_requested"] = {"force": force}
        busy = agent["job"] is not None
        agent["connection_state"] = "stopping" if busy and not force else "stopped"
        return web.Response(status=204)

    def _get_organization(self, call: _Call) -> web.StreamResponse:
        self._check_org(call)
        return web.json_response(copy.deepcopy(self.organization))

    def _get_user(self, call: _Call) -> web.StreamResponse:
        return web.json_response(copy.deepcopy(self.user))

    def _get_access_token(self, call: _Call) -> web.StreamResponse:
        return web.json_response(
            {"uuid": self.token_uuid, "scopes": list(self.scopes), "description": "chatops"}
        )

    # Helpers

    def _paginated(self, call: _Call, items: list[JSON]) -> web.StreamResponse:
        try:
            page = int(call.query.get("page", "1"))
            per_page = min(int(call.query.get("per_page", "30")), 100)
        except ValueError:
            raise _Unexpected("page and per_page must be integers") from None
        if page < 1 or per_page < 1:
            raise _Unexpected("page and per_page must be positive")
        last = max(math.ceil(len(items) / per_page), 1)
        response = web.json_response(items[(page - 1) * per_page : page * per_page])
        kept = [(key, value) for key, value in call.query.items() if key != "page"]
        base = f"{self.origin}{call.request.rel_url.raw_path}"

        def link(number: int, rel: str) -> str:
            return f'<{base}?{urlencode([*kept, ("page", str(number))])}>; rel="{rel}"'

        links = []
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        if links:
            response.headers["Link"] = ", ".join(links)
        return response

    def _check_org(self, call: _Call) -> None:
        if call.args.get("org", self.org) != self.org:
            raise _Reply(404, "No organization found")

    def _pipeline(self, slug: str) -> JSON:
        try:
            return self.pipelines[slug]
        except KeyError:
            raise _Reply(404, "Not Found") from None

    def _pipeline_for(self, call: _Call) -> JSON:
        self._check_org(call)
        return self._pipeline(call.args["slug"])

    def _build_for(self, call: _Call) -> JSON:
        self._pipeline_for(call)
        try:
            return self.build(call.args["slug"], int(call.args["number"]))
        except KeyError:
            raise _Reply(404, "Not Found") from None

    def _job(self, build: JSON, job_id: str) -> JSON:
        jobs: list[JSON] = build["jobs"]
        for job in jobs:
            if job["id"] == job_id:
                return job
        raise KeyError(job_id)

    def _job_for(self, call: _Call, build: JSON) -> JSON:
        try:
            return self._job(build, call.args["job"])
        except KeyError:
            raise _Reply(404, "No job found") from None

    def _agent_for(self, call: _Call) -> JSON:
        self._check_org(call)
        try:
            return self.agents[call.args["agent"]]
        except KeyError:
            raise _Reply(404, "No agent found") from None

    @staticmethod
    def _json_object(call: _Call, allowed: Iterable[str] | None) -> JSON:
        body = call.json if call.json is not None else {}
        if not isinstance(body, dict):
            raise _Unexpected("the JSON body is not an object")
        if allowed is not None and (unknown := set(body) - set(allowed)):
            raise _Unexpected(f"unknown body fields {sorted(unknown)}")
        return body

    @staticmethod
    def _no_body(call: _Call) -> None:
        if call.json is not None:
            raise _Unexpected("this endpoint takes no body")

    def _creator(self) -> JSON:
        return {key: self.user[key] for key in ("id", "name", "email")}

    def _new_build(
        self,
        pipeline: JSON,
        *,
        commit: str,
        branch: str,
        message: str,
        meta_data: JSON,
        env: JSON,
        author: JSON | str,
        source: str,
        created_at: datetime | None = None,
    ) -> JSON:
        slug = pipeline["slug"]
        number = self._next_number[slug]
        self._next_number[slug] = number + 1
        created = _now_iso(created_at or self.now())
        url = f"{API_URL}/organizations/{self.org}/pipelines/{slug}/builds/{number}"
        summary_keys = ("id", "graphql_id", "url", "web_url", "name", "slug", "repository")
        build: JSON = {
            "id": str(uuid.uuid4()),
            "graphql_id": f"build-{slug}-{number}",
            "url": url,
            "web_url": f"https://buildkite.com/{self.org}/{slug}/builds/{number}",
            "number": number,
            "state": "scheduled",
            "blocked": False,
            "blocked_state": "",
            "cancel_reason": None,
            "message": message,
            "commit": commit,
            "branch": branch,
            "tag": None,
            "env": env,
            "source": source,
            "author": author,
            "creator": self._creator(),
            "created_at": created,
            "scheduled_at": created,
            "started_at": None,
            "finished_at": None,
            "meta_data": meta_data,
            "pull_request": None,
            "rebuilt_from": None,
            "pipeline": {
                **{key: pipeline[key] for key in summary_keys},
                "default_branch": pipeline["default_branch"],
            },
            "jobs": [],
        }
        blocked_yet = False
        for template in self._steps.get(slug, []):
            job = self._new_job(build, template, waiting=blocked_yet)
            blocked_yet = blocked_yet or template["type"] == "manual"
            build["jobs"].append(job)
        self.builds.append(build)
        return build

    def _new_job(self, build: JSON, template: JSON, *, waiting: bool) -> JSON:
        job_id = str(uuid.uuid4())
        job: JSON = {
            "id": job_id,
            "graphql_id": f"job-{job_id}",
            "type": template["type"],
            "web_url": f"{build['web_url']}#{job_id}",
            "created_at": build["created_at"],
        }
        if template["type"] == "manual":
            job.update(
                label=template["label"],
                step_key=template.get("key"),
                state="waiting",
                unblock_url=f"{build['url']}/jobs/{job_id}/unblock",
                unblockable=False,
                unblocked_by=None,
                unblocked_at=None,
            )
            job["web_url"] = None  # as on Buildkite: a block step has no page of its own
            self._block_fields[job_id] = [dict(f) for f in template.get("fields") or []]
            return job
        name = template["name"]
        job.update(
            name=name,
            label=name,
            step_key=_key(name),
            state="waiting" if waiting else "scheduled",
            command=f"make {_key(name)}",
            log_url=f"{build['url']}/jobs/{job_id}/log",
            raw_log_url=f"{build['url']}/jobs/{job_id}/log.txt",
            soft_failed=False,
            exit_status=None,
            agent=None,
            retried=False,
            retried_in_job_id=None,
            retries_count=None,
            scheduled_at=build["created_at"],
            started_at=None,
            finished_at=None,
        )
        return job

    def _retry(self, build: JSON, job: JSON) -> JSON:
        new = copy.deepcopy(job)
        new_id = str(uuid.uuid4())
        new.update(
            id=new_id,
            graphql_id=f"job-{new_id}",
            web_url=f"{build['web_url']}#{new_id}",
            log_url=f"{build['url']}/jobs/{new_id}/log",
            raw_log_url=f"{build['url']}/jobs/{new_id}/log.txt",
            state="scheduled",
            exit_status=None,
            started_at=None,
            finished_at=None,
            retries_count=(job["retries_count"] or 0) + 1,
        )
        job.update(retried=True, retried_in_job_id=new_id)
        build["jobs"].insert(build["jobs"].index(job) + 1, new)
        build.update(state="running", finished_at=None, blocked=False, blocked_state="")
        return self._job_json(new)

    @staticmethod
    def _reachable_jobs(build: JSON) -> set[str]:
        """Ids of the jobs up to and including the first block step not yet unblocked."""
        reachable = set()
        for job in build["jobs"]:
            reachable.add(job["id"])
            if (
                job["type"] == "manual"
                and job.get("state") != "unblocked"
                and not job.get("retried")
            ):
                break
        return reachable

    @staticmethod
    def _finish_job(job: JSON, state: str, exit_status: int, now: str) -> None:
        job.update(state=state, exit_status=exit_status, finished_at=now)
        job["started_at"] = job["started_at"] or now

    @staticmethod
    def _default_log(job: JSON) -> str:
        lines = [f"~~~ Running {job.get('name') or job['type']}", f"$ {job.get('command')}"]
        lines += [f"step {n}: ok" for n in range(1, 41)]
        lines.append(f"exit status {job.get('exit_status')}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _job_json(job: JSON) -> JSON:
        return copy.deepcopy(job)

    def _build_json(
        self, build: JSON, *, jobs: bool = True, pipeline: bool = True, retried: bool = False
    ) -> JSON:
        data = copy.deepcopy(build)
        if not jobs:
            del data["jobs"]
        else:
            # Like Buildkite, hide jobs that were retried unless include_retried_jobs=true.
            data["jobs"] = [
                self._job_json(job) for job in data["jobs"] if retried or not job.get("retried")
            ]
        if not pipeline:
            del data["pipeline"]
        return data
