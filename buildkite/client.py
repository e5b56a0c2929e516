"""Async client for Buildkite's REST API v2: one method per endpoint, pydantic models out.

Retries, rate-limit waits and pagination live here so callers never see them, and a request
that starts a build is never blindly sent twice (see ``create_build``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from buildkite.errors import (
    BuildkiteAPIError,
    BuildkiteError,
    BuildkiteUnavailable,
    BuildMaybeStarted,
    RateLimited,
    ServerError,
    UnexpectedResponse,
    error_for_status,
)
from buildkite.models import (
    STATE_FILTERS,
    AccessToken,
    Agent,
    Author,
    Build,
    BuildState,
    Cluster,
    Job,
    Organization,
    Pipeline,
    User,
    fields_at_fault,
    item_id,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "REQUEST_ID_META_KEY",
    "SOURCE_META_KEY",
    "SOURCE_META_VALUE",
    "BuildkiteClient",
    "RateLimitBudget",
    "StartLookup",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.buildkite.com/v2"

#: Every build the bot creates carries these in its meta_data, so it can find its own builds.
REQUEST_ID_META_KEY = "chatops_request_id"
SOURCE_META_KEY = "chatops_source"
SOURCE_META_VALUE = "slack"

MAX_PER_PAGE = 100
# Buildkite's window is 60 s, so a longer wait for one 429 would only mean a bad header.
_MAX_RATE_LIMIT_WAIT_EACH = 60.0
_MAX_BACKOFF = 30.0
_CLUSTERS_TTL = 300.0
# How far our clock may disagree with Buildkite's when looking for a rebuild we may have made.
_CLOCK_SKEW = timedelta(minutes=2)
# Requests sent at once. Beyond the HTTP pool's size they would wait in httpcore's queue, whose
# every release rescans the whole queue: a burst of deploys then starves the event loop.
DEFAULT_MAX_CONCURRENT_REQUESTS = 10

# Slugs and ids are validated, not just quoted, so a value can never address another resource.
_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_META_KEY_RE = re.compile(r"[^\[\]\s&=#]+")

_Model = TypeVar("_Model", bound=BaseModel)

#: Buildkite's two rate-limit scopes, the headers each is reported in, and the ``scope`` a 429
#: body names when it is the one exceeded.
ORGANIZATION_SCOPE = "organization"
USER_SCOPE = "user"
_SCOPE_HEADERS = {ORGANIZATION_SCOPE: "RateLimit-", USER_SCOPE: "RateLimit-User-"}
_BODY_SCOPES = {"rest": ORGANIZATION_SCOPE, "rest_user": USER_SCOPE}


@dataclass(frozen=True)
class StartLookup:
    """How long to look for the build of a create or rebuild that may have reached Buildkite
    without an answer: as long as a create can take, with waits doubling up to ``max_wait``."""

    #: Seconds of waiting in all; a create that is still unknown then is reported as such.
    patience: float = 60.0
    first_wait: float = 1.0
    max_wait: float = 16.0

    def __post_init__(self) -> None:
        if self.patience < 0 or self.first_wait <= 0 or self.max_wait < self.first_wait:
            raise ValueError("start lookup waits must be positive and patience not negative")

    def waits(self) -> Iterator[float]:
        """The wait before each look: 1, 2, 4, 8, 16, 16, ... adding up to ``patience``."""
        left, wait = self.patience, self.first_wait
        while True:
            this = min(wait, left) if left > 0 else 0.0
            yield this
            left -= this
            if left <= 0:
                return
            wait = min(wait * 2, self.max_wait)


class RateLimitBudget:
    """One rate-limit scope as Buildkite's latest answer reported it (reset in seconds)."""

    __slots__ = ("limit", "remaining", "reset", "scope")

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.remaining: int | None = None
        self.limit: int | None = None
        self.reset: float | None = None

    def __repr__(self) -> str:
        return (
            f"RateLimitBudget({self.scope!r}, remaining={self.remaining}, limit={self.limit}, "
            f"reset={self.reset})"
        )


def _user_agent() -> str:
    try:
        version = metadata.version("buildkite-slack-chatops")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"buildkite-slack-chatops/{version} (Slack ChatOps bot) httpx/{httpx.__version__}"


USER_AGENT = _user_agent()


class BuildkiteClient:
    """Buildkite REST API v2 for one organization, over one shared ``httpx.AsyncClient``.

    Docs: https://buildkite.com/docs/apis/rest-api
    """

    def __init__(
        self,
        token: str | SecretStr,
        org: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        http: httpx.AsyncClient | None = None,
        timeout: float = 15.0,
        max_retries: int = 3,
        max_rate_limit_wait: float = 60.0,
        backoff_base: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        start_lookup: StartLookup | None = None,
    ) -> None:
        """``max_concurrent_requests`` should not exceed the pool size of ``http``; the others
        wait their turn, first come first served."""
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        if not self._token.get_secret_value():
            raise ValueError("a Buildkite API token is required")
        if timeout <= 0 or max_retries < 0 or max_rate_limit_wait < 0 or backoff_base < 0:
            raise ValueError("timeout must be positive; retries and waits must not be negative")
        if max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        self.org = _slug(org, "organization")
        self.base_url = base_url.rstrip("/")
        self._base = httpx.URL(self.base_url + "/")
        if self._base.scheme not in {"http", "https"} or not self._base.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._timeout = httpx.Timeout(timeout)
        self._max_retries = max_retries
        self._max_rate_limit_wait = max_rate_limit_wait
        self._backoff_base = backoff_base
        self._sleep = sleep
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._random = random.Random()
        #: The organization's (``RateLimit-*``) and the token user's (``RateLimit-User-*``)
        #: budgets, from the latest response that reported each, for callers that pace
        #: themselves, like the poller.
        self.rate_limits: dict[str, RateLimitBudget] = {
            scope: RateLimitBudget(scope) for scope in _SCOPE_HEADERS
        }
        self._clusters: tuple[float, list[Cluster]] | None = None
        #: How long a create or rebuild without an answer is looked for (see _start_build).
        self.start_lookup = start_lookup or StartLookup()

    def __repr__(self) -> str:
        return f"BuildkiteClient(org={self.org!r}, base_url={self.base_url!r})"

    @property
    def tighter_rate_limit(self) -> RateLimitBudget | None:
        """The scope with the fewest requests left (either scope's 429 stops every call)."""
        known = [b for b in self.rate_limits.values() if b.remaining is not None]
        return min(known, key=lambda b: b.remaining or 0, default=None)

    @property
    def rate_limit_remaining(self) -> int | None:
        """Requests left in the tighter of the two scopes."""
        budget = self.tighter_rate_limit
        return budget.remaining if budget else None

    @property
    def rate_limit_limit(self) -> int | None:
        budget = self.tighter_rate_limit
        return budget.limit if budget else None

    @property
    def rate_limit_reset(self) -> float | None:
        budget = self.tighter_rate_limit
        return budget.reset if budget else None

    async def aclose(self) -> None:
        """Close the HTTP client, unless it was handed to us (its owner closes it)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Builds

    async def create_build(
        self,
        pipeline: str,
        *,
        commit: str,
        branch: str,
        message: str | None = None,
        author: Author | None = None,
        env: Mapping[str, str] | None = None,
        meta_data: Mapping[str, str] | None = None,
        clean_checkout: bool | None = None,
        request_id: str | None = None,
    ) -> Build:
        """Create a build; after a lost answer, look for it by ``request_id`` before resending.

        https://buildkite.com/docs/apis/rest-api/builds#create-a-build
        """
        path = f"{self._pipeline_path(pipeline)}/builds"
        request_id = request_id or uuid.uuid4().hex
        body: dict[str, Any] = {"commit": commit, "branch": branch}
        if message is not None:
            body["message"] = message
        if author is not None:
            body["author"] = author.model_dump()
        if env:
            body["env"] = dict(env)
        body["meta_data"] = {
            **(meta_data or {}),
            REQUEST_ID_META_KEY: request_id,
            SOURCE_META_KEY: SOURCE_META_VALUE,
        }
        if clean_checkout is not None:
            body["clean_checkout"] = clean_checkout

        async def find_created() -> Build | None:
            return await self.find_created_build(pipeline, request_id)

        return await self._start_build("POST", path, body, find_created, request_id=request_id)

    async def find_created_build(self, pipeline: str, request_id: str) -> Build | None:
        """The build that a create with this ``request_id`` started, if it exists.

        https://buildkite.com/docs/apis/rest-api/builds#list-builds-for-a-pipeline
        """
        found = [
            build
            async for build in self.list_builds(
                pipeline=pipeline, meta_data={REQUEST_ID_META_KEY: request_id}, limit=10
            )
        ]
        # A rebuild of our build copies its meta_data; the original is the one we made.
        originals = [build for build in found if build.rebuilt_from is None] or found
        return min(originals, key=lambda build: build.number, default=None)

    async def get_build(self, pipeline: str, number: int) -> Build:
        """Get one build of a pipeline by its number.

        https://buildkite.com/docs/apis/rest-api/builds#get-a-build
        """
        return await self._get(self._build_path(pipeline, number), Build)

    async def cancel_build(self, pipeline: str, number: int) -> Build:
        """Cancel a scheduled, running or failing build (422 otherwise).

        https://buildkite.com/docs/apis/rest-api/builds#cancel-a-build
        """
        response = await self._request("PUT", f"{self._build_path(pipeline, number)}/cancel")
        return self._parse(response, Build)

    async def rebuild_build(self, pipeline: str, number: int) -> Build:
        """Rebuild a build and return the NEW build, never starting two for one call.

        After a lost answer it looks for a rebuild of ``number`` made since the request was
        sent (give or take clock skew) rather than rebuilding again.

        https://buildkite.com/docs/apis/rest-api/builds#rebuild-a-build
        """
        path = f"{self._build_path(pipeline, number)}/rebuild"
        sent_at = datetime.now(UTC)

        async def find_rebuild() -> Build | None:
            return await self.find_rebuild(pipeline, number, since=sent_at)

        return await self._start_build("PUT", path, None, find_rebuild, request_id=None)

    async def find_rebuild(self, pipeline: str, number: int, *, since: datetime) -> Build | None:
        """The oldest rebuild of build ``number`` created since ``since`` (less clock skew).

        Buildkite has no filter by ``rebuilt_from``: the pipeline's recent builds are read.
        https://buildkite.com/docs/apis/rest-api/builds#list-builds-for-a-pipeline
        """
        found = None
        async for build in self.list_builds(
            pipeline=pipeline, created_from=since - _CLOCK_SKEW, limit=MAX_PER_PAGE
        ):
            if build.rebuilt_from is not None and build.rebuilt_from.number == number:
                found = build  # newest first: the last one listed is the oldest
        return found

    async def retry_failed_jobs(self, pipeline: str, number: int) -> None:
        """Retry every failed job of a build (202 Accepted).

        https://buildkite.com/docs/apis/rest-api/builds#retry-failed-jobs
        """
        await self._request("PUT", f"{self._build_path(pipeline, number)}/retry_failed_jobs")

    def list_builds(
        self,
        *,
        pipeline: str | None = None,
        all_organizations: bool = False,
        state: Sequence[BuildState | str] | BuildState | str | None = None,
        branch: str | Sequence[str] | None = None,
        commit: str | None = None,
        created_from: datetime | None = None,
        finished_from: datetime | None = None,
        meta_data: Mapping[str, str] | None = None,
        exclude_jobs: bool = False,
        exclude_pipeline: bool = False,
        include_retried_jobs: bool = False,
        per_page: int = MAX_PER_PAGE,
        limit: int | None = None,
    ) -> AsyncIterator[Build]:
        """Iterate over builds, newest first, across pages; naive datetimes are taken as UTC.

        https://buildkite.com/docs/apis/rest-api/builds#list-builds-for-a-pipeline
        """
        if all_organizations and pipeline is not None:
            raise ValueError("all_organizations lists builds everywhere; it takes no pipeline")
        if all_organizations:
            path = "/builds"
        elif pipeline is not None:
            path = f"{self._pipeline_path(pipeline)}/builds"
        else:
            path = f"{self._org_path}/builds"
        params: list[tuple[str, str]] = []
        if state is not None:
            states = [state] if isinstance(state, str) else list(state)
            for value in states:
                if str(value) not in STATE_FILTERS:
                    raise ValueError(f"unknown build state filter {value!r}")
                params.append(("state[]", str(value)))
        if isinstance(branch, str):
            params.append(("branch", branch))
        elif branch is not None:
            params.extend(("branch[]", name) for name in branch)
        if commit is not None:
            params.append(("commit", commit))
        if created_from is not None:
            params.append(("created_from", _iso8601(created_from)))
        if finished_from is not None:
            params.append(("finished_from", _iso8601(finished_from)))
        for key, value in (meta_data or {}).items():
            if not _META_KEY_RE.fullmatch(key):
                raise ValueError(f"invalid meta_data key {key!r}")
            params.append((f"meta_data[{key}]", value))
        if exclude_jobs:
            params.append(("exclude_jobs", "true"))
        if exclude_pipeline:
            params.append(("exclude_pipeline", "true"))
        if include_retried_jobs:
            params.append(("include_retried_jobs", "true"))
        return self._paginate(path, params, Build, per_page=per_page, limit=limit)

    # Jobs

    async def retry_job(self, pipeline: str, number: int, job_id: str) -> Job:
        """Retry a failed, timed out or canceled job; returns the new job.

        https://buildkite.com/docs/apis/rest-api/jobs#retry-a-job
        """
        response = await self._request("PUT", f"{self._job_path(pipeline, number, job_id)}/retry")
        return self._parse(response, Job)

    async def unblock_job(
        self,
        pipeline: str,
        number: int,
        job_id: str,
        *,
        fields: Mapping[str, str] | None = None,
        unblocker: str | None = None,
    ) -> Job:
        """Unblock a block (manual) step, optionally filling its fields, as ``unblocker`` (a uuid).

        https://buildkite.com/docs/apis/rest-api/jobs#unblock-a-job
        """
        body: dict[str, Any] = {}
        if fields:
            body["fields"] = dict(fields)
        if unblocker is not None:
            body["unblocker"] = unblocker
        path = f"{self._job_path(pipeline, number, job_id)}/unblock"
        response = await self._request("PUT", path, json=body)
        return self._parse(response, Job)

    async def job_log_tail(
        self, pipeline: str, number: int, job_id: str, *, max_bytes: int = 4000
    ) -> str:
        """The last ``max_bytes`` of a job's log, as text (needs the read_build_logs scope).

        https://buildkite.com/docs/apis/rest-api/jobs#get-a-jobs-log-output
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        response = await self._request(
            "GET",
            f"{self._job_path(pipeline, number, job_id)}/log",
            headers={"Range": f"bytes=-{max_bytes}", "Accept": "text/plain"},
            follow_redirects=True,
        )
        raw = response.content
        if response.headers.get("Content-Type", "").startswith("application/json"):
            data = self._json(response)
            content = data.get("content") if isinstance(data, dict) else None
            raw = str(content or "").encode()
        # A byte range can start mid-character; drop what that leaves undecodable at the start.
        return raw[-max_bytes:].decode("utf-8", errors="replace").lstrip("\ufffd")

    # Pipelines

    def list_pipelines(
        self, *, per_page: int = MAX_PER_PAGE, limit: int | None = None
    ) -> AsyncIterator[Pipeline]:
        """Iterate over the organization's pipelines, across pages.

        https://buildkite.com/docs/apis/rest-api/pipelines#list-pipelines
        """
        path = f"{self._org_path}/pipelines"
        return self._paginate(path, [], Pipeline, per_page=per_page, limit=limit)

    async def get_pipeline(self, slug: str) -> Pipeline:
        """Get one pipeline.

        https://buildkite.com/docs/apis/rest-api/pipelines#get-a-pipeline
        """
        return await self._get(self._pipeline_path(slug), Pipeline)

    async def create_pipeline(
        self,
        *,
        name: str,
        repository: str,
        configuration: str,
        cluster_id: str | None = None,
        **extra: Any,
    ) -> Pipeline:
        """Create a YAML pipeline; never retried, as a retry could create it twice.

        ``cluster_id`` is required on an organization that uses clusters.

        https://buildkite.com/docs/apis/rest-api/pipelines#create-a-yaml-pipeline
        """
        body = {"name": name, "repository": repository, "configuration": configuration, **extra}
        if cluster_id is not None:
            body["cluster_id"] = _identifier(cluster_id, "cluster id")
        path = f"{self._org_path}/pipelines"
        response = await self._request("POST", path, json=body, retry=False)
        return self._parse(response, Pipeline)

    async def update_pipeline(self, slug: str, **fields: Any) -> Pipeline:
        """Change some of a pipeline's settings.

        https://buildkite.com/docs/apis/rest-api/pipelines#update-a-pipeline
        """
        if not fields:
            raise ValueError("update_pipeline needs at least one field to change")
        response = await self._request("PATCH", self._pipeline_path(slug), json=fields)
        return self._parse(response, Pipeline)

    async def delete_pipeline(self, slug: str) -> None:
        """Delete a pipeline (204 No Content).

        https://buildkite.com/docs/apis/rest-api/pipelines#delete-a-pipeline
        """
        await self._request("DELETE", self._pipeline_path(slug))

    # Agents

    def list_agents(
        self,
        *,
        name: str | None = None,
        hostname: str | None = None,
        version: str | None = None,
        per_page: int = MAX_PER_PAGE,
        limit: int | None = None,
    ) -> AsyncIterator[Agent]:
        """Iterate over the organization's connected agents, optionally filtered.

        https://buildkite.com/docs/apis/rest-api/agents#list-agents
        """
        filters = {"name": name, "hostname": hostname, "version": version}
        params = [(key, value) for key, value in filters.items() if value is not None]
        path = f"{self._org_path}/agents"
        return self._paginate(path, params, Agent, per_page=per_page, limit=limit)

    async def get_agent(self, agent_id: str) -> Agent:
        """Get one agent.

        https://buildkite.com/docs/apis/rest-api/agents#get-an-agent
        """
        return await self._get(self._agent_path(agent_id), Agent)

    async def stop_agent(self, agent_id: str, *, force: bool = False) -> None:
        """Stop an agent; graceful by default (Buildkite's own default cancels the running job).

        https://buildkite.com/docs/apis/rest-api/agents#stop-an-agent
        """
        await self._request("PUT", f"{self._agent_path(agent_id)}/stop", json={"force": force})

    # Clusters

    async def list_clusters(self) -> list[Cluster]:
        """The organization's clusters (empty when it uses none); cached for a few minutes,
        as clusters change rarely and pipeline creation asks each time.

        https://buildkite.com/docs/apis/rest-api/clusters#clusters-list-clusters
        """
        now = time.monotonic()
        if self._clusters is not None and now - self._clusters[0] < _CLUSTERS_TTL:
            return list(self._clusters[1])
        path = f"{self._org_path}/clusters"
        clusters = [
            cluster
            async for cluster in self._paginate(
                path, [], Cluster, per_page=MAX_PER_PAGE, limit=None
            )
        ]
        self._clusters = (now, clusters)
        return list(clusters)

    # Organization, user, token

    async def get_organization(self) -> Organization:
        """Get the client's organization.

        https://buildkite.com/docs/apis/rest-api/organizations#get-an-organization
        """
        return await self._get(self._org_path, Organization)

    async def get_user(self) -> User:
        """Get the user who owns the API token.

        https://buildkite.com/docs/apis/rest-api/user#get-the-current-user
        """
        return await self._get("/user", User)

    async def get_access_token(self) -> AccessToken:
        """Describe the API token in use, including its scopes.

        https://buildkite.com/docs/apis/rest-api/access-token#get-the-current-token
        """
        return await self._get("/access-token", AccessToken)

    # Paths

    @property
    def _org_path(self) -> str:
        return f"/organizations/{quote(self.org, safe='')}"

    def _pipeline_path(self, pipeline: str) -> str:
        return f"{self._org_path}/pipelines/{quote(_slug(pipeline, 'pipeline'), safe='')}"

    def _build_path(self, pipeline: str, number: int) -> str:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"a build number must be a positive int, got {number!r}")
        return f"{self._pipeline_path(pipeline)}/builds/{number}"

    def _job_path(self, pipeline: str, number: int, job_id: str) -> str:
        job = quote(_identifier(job_id, "job id"), safe="")
        return f"{self._build_path(pipeline, number)}/jobs/{job}"

    def _agent_path(self, agent_id: str) -> str:
        return f"{self._org_path}/agents/{quote(_identifier(agent_id, 'agent id'), safe='')}"

    # Transport

    async def _get(self, path: str, model: type[_Model]) -> _Model:
        response = await self._request("GET", path)
        return self._parse(response, model)

    async def _request(
        self,
        method: str,
        target: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send one API call: wait out 429s, retry transient failures when ``retry``.

        After a failure that may have reached Buildkite (a timeout once sent, a cut connection,
        a 5xx) only a request safe to send twice (``_SAFE_TO_RESEND``) is sent again: an
        unblock, a cancel or a retry of jobs may have been done already, and a second copy
        would be refused, or act twice. Those are sent again only when they certainly never
        left (no connection) or got a 429.

        ``target`` is a path under the base URL, or an absolute URL from a ``Link`` header.
        """
        resend = retry and method.upper() in _SAFE_TO_RESEND
        url = target if target.startswith(("http://", "https://")) else self.base_url + target
        path = self._display_path(url)
        request_headers = {
            "Authorization": f"Bearer {self._token.get_secret_value()}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            **(headers or {}),
        }
        failures = 0
        rate_limit_waited = 0.0
        while True:
            try:
                # Held for the request only, never across a backoff or rate-limit wait.
                async with self._slots:
                    response = await self._http.request(
                        method,
                        url,
                        params=list(params) if params else None,
                        json=json,
                        headers=request_headers,
                        timeout=self._timeout,
                        follow_redirects=follow_redirects,
                    )
            except httpx.TransportError as exc:
                never_sent = isinstance(exc, _NEVER_SENT)
                if (resend or (retry and never_sent)) and failures < self._max_retries:
                    failures += 1
                    await self._sleep(self._backoff(failures))
                    continue
                reason = self._scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
                raise BuildkiteUnavailable(
                    method, path, attempts=failures + 1, reason=reason, reached=not never_sent
                ) from exc
            self._note_rate_limit(response)
            status = response.status_code
            if status == 429:
                # A 429 means Buildkite did nothing, so even a POST is safe to send again.
                delay = self._rate_limit_delay(response)
                if rate_limit_waited + delay > self._max_rate_limit_wait:
                    raise self._api_error(response, method, path)
                rate_limit_waited += delay
                await self._sleep(delay)
                continue
            if status >= 500 and resend and failures < self._max_retries:
                failures += 1
                await self._sleep(self._backoff(failures))
                continue
            if response.is_success:
                return response
            raise self._api_error(response, method, path)

    async def _start_build(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        find_started: Callable[[], Awaitable[Build | None]],
        *,
        request_id: str | None,
    ) -> Build:
        """Send a request that starts a build, and never send it twice once it may have arrived.

        A request that certainly never reached Buildkite (no connection was made) is retried
        like any other. After one that may have (a timeout once sent, a lost answer, a 5xx),
        ``find_started`` looks for its build, with backoff, for ``start_lookup.patience``
        seconds; ``BuildMaybeStarted`` if it never shows up. Buildkite may still be creating it.
        """
        failures = 0
        while True:
            try:
                response = await self._request(method, path, json=body, retry=False)
            except BuildkiteUnavailable as exc:
                if _never_sent(exc) and failures < self._max_retries:
                    failures += 1
                    await self._sleep(self._backoff(failures))
                    continue
                if _never_sent(exc):
                    raise BuildkiteUnavailable(
                        method, exc.path, attempts=failures + 1, reason=exc.reason, reached=False
                    ) from exc
                reason = exc.reason
            except ServerError as exc:
                reason = f"HTTP {exc.status}"
            else:
                return self._parse(response, Build)
            break
        waited = 0.0
        began = time.monotonic()
        for wait in self.start_lookup.waits():
            await self._sleep(wait)
            waited += wait
            try:
                found = await find_started()
            except BuildkiteError as exc:
                # Not an answer either way: keep looking while patience lasts.
                log.warning("looking for the build of %s %s failed: %s", method, path, exc)
                found = None
            if found is not None:
                log.info(
                    "%s %s got no answer (%s); its build #%s was found after %.0f s",
                    method,
                    self._display_path(self.base_url + path),
                    reason,
                    found.number,
                    time.monotonic() - began,
                )
                return found
            if time.monotonic() - began >= self.start_lookup.patience:
                break
        raise BuildMaybeStarted(
            method,
            self._display_path(self.base_url + path),
            reason=reason,
            waited=max(waited, time.monotonic() - began),
            request_id=request_id,
        )

    def _paginate(
        self,
        path: str,
        params: list[tuple[str, str]],
        model: type[_Model],
        *,
        per_page: int,
        limit: int | None,
    ) -> AsyncIterator[_Model]:
        # Validated here, not in the generator, so a bad call fails where it is made.
        if isinstance(per_page, bool) or per_page < 1:
            raise ValueError("per_page must be at least 1")
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        # No point fetching 100 builds to keep 5.
        per_page = min(per_page, MAX_PER_PAGE, limit or MAX_PER_PAGE)
        return self._pages(path, [*params, ("per_page", str(per_page))], model, limit)

    async def _pages(
        self,
        path: str,
        params: list[tuple[str, str]],
        model: type[_Model],
        limit: int | None,
    ) -> AsyncIterator[_Model]:
        if limit == 0:
            return
        target: str | None = path
        query: list[tuple[str, str]] | None = params
        count = 0
        while target is not None:
            response = await self._request("GET", target, params=query)
            query = None  # the next link carries the whole query
            items = self._json(response)
            if not isinstance(items, list):
                raise self._unexpected_response(response, "not a JSON list")
            for item in items:
                try:
                    parsed = model.model_validate(item)
                except ValidationError as exc:
                    # One odd item must not hide the page around it.
                    log.warning(
                        "skipped %s %s listed by %s: unreadable %s",
                        model.__name__.lower(),
                        item_id(item),
                        self._display_path(str(response.request.url)),
                        fields_at_fault(exc),
                    )
                    continue
                yield parsed
                count += 1
                if limit is not None and count >= limit:
                    return
            target = self._next_link(response)

    def _next_link(self, response: httpx.Response) -> str | None:
        url = response.links.get("next", {}).get("url")
        if not url:
            return None
        next_url = self._base.join(url)
        # The next request carries our token: never send it anywhere but Buildkite.
        if (next_url.scheme, next_url.host, next_url.port) != (
            self._base.scheme,
            self._base.host,
            self._base.port,
        ):
            raise BuildkiteError(f"refusing to follow a pagination link to {next_url.host}")
        return str(next_url)

    def _display_path(self, url: str) -> str:
        """The request path relative to the base URL, without host or query."""
        path = httpx.URL(url).path
        prefix = self._base.path.rstrip("/")
        if prefix and path.startswith(prefix + "/"):
            return path[len(prefix) :]
        return path

    def _backoff(self, failures: int) -> float:
        delay = self._backoff_base * 2.0 ** (failures - 1)
        return min(delay, _MAX_BACKOFF) + self._random.uniform(0, self._backoff_base)

    def _rate_limit_delay(self, response: httpx.Response) -> float:
        reset = self._hit_scope_reset(response)[1]
        if reset is None:
            reset = _MAX_RATE_LIMIT_WAIT_EACH
        reset = min(max(reset, 0.0), _MAX_RATE_LIMIT_WAIT_EACH)
        return reset + 0.5 + self._random.uniform(0, 1)

    def _note_rate_limit(self, response: httpx.Response) -> None:
        for scope, prefix in _SCOPE_HEADERS.items():
            budget = self.rate_limits[scope]
            remaining = _float_header(response, f"{prefix}Remaining")
            if remaining is not None:
                budget.remaining = int(remaining)
            limit = _float_header(response, f"{prefix}Limit")
            if limit is not None:
                budget.limit = int(limit)
            reset = _float_header(response, f"{prefix}Reset")
            if reset is not None:
                budget.reset = reset
        if response.status_code == 429:
            scope, reset = self._hit_scope_reset(response)
            budget = self.rate_limits[scope]
            budget.remaining = 0
            if reset is not None:
                budget.reset = reset

    def _hit_scope_reset(self, response: httpx.Response) -> tuple[str, float | None]:
        """Which scope a 429 exceeded and its seconds to reset: the body's ``scope`` and
        ``reset`` first, then the headers of the scope that has nothing left."""
        body_scope, body_reset = _rate_limit_body(response)
        scope = body_scope
        if scope is None:
            exhausted = [
                name
                for name, prefix in _SCOPE_HEADERS.items()
                if _float_header(response, f"{prefix}Remaining") == 0
            ]
            scope = exhausted[-1] if exhausted else ORGANIZATION_SCOPE
        if body_reset is not None:
            return scope, body_reset
        return scope, _float_header(response, f"{_SCOPE_HEADERS[scope]}Reset")

    def _api_error(self, response: httpx.Response, method: str, path: str) -> BuildkiteAPIError:
        status = response.status_code
        message = response.reason_phrase or f"HTTP {status}"
        errors: list[dict[str, Any]] = []
        try:
            body = response.json()
        except ValueError:
            body = None  # an HTML error page from a proxy, say
        if isinstance(body, dict):
            if isinstance(body.get("message"), str) and body["message"]:
                message = body["message"]
            if isinstance(body.get("errors"), list):
                errors = [
                    {
                        key: self._scrub(value) if isinstance(value, str) else value
                        for key, value in item.items()
                    }
                    for item in body["errors"]
                    if isinstance(item, dict)
                ]
        message = self._scrub(message)
        if status == 429:
            scope, reset = self._hit_scope_reset(response)
            return RateLimited(
                status,
                message,
                method=method,
                path=path,
                errors=errors,
                reset=reset,
                scope=scope,
            )
        return error_for_status(status)(status, message, method=method, path=path, errors=errors)

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._unexpected_response(response, "not JSON") from None

    def _parse(self, response: httpx.Response, model: type[_Model]) -> _Model:
        return self._parse_item(response, model, self._json(response))

    def _parse_item(self, response: httpx.Response, model: type[_Model], item: Any) -> _Model:
        try:
            return model.model_validate(item)
        except ValidationError as exc:
            fields = sorted({".".join(map(str, error["loc"])) for error in exc.errors()})
            reason = f"not a {model.__name__} (bad {', '.join(fields) or 'value'})"
            raise self._unexpected_response(response, reason) from None

    def _unexpected_response(self, response: httpx.Response, reason: str) -> UnexpectedResponse:
        path = self._display_path(str(response.request.url))
        return UnexpectedResponse(response.request.method, path, reason)

    def _scrub(self, text: str) -> str:
        # Buildkite does not echo tokens, but a proxy or a future message might.
        return text.replace(self._token.get_secret_value(), "[redacted]")


#: Methods whose second copy does what the first did and gets the same answer: reads, and a
#: PATCH of a pipeline's settings. A PUT action (cancel, unblock, retry, stop) or a DELETE sent
#: again after it was done is refused (422, 404), or acts twice.
_SAFE_TO_RESEND = frozenset({"GET", "HEAD", "PATCH"})

#: Failures that mean no connection was made, so the request never left: safe to send again.
#: Any other transport failure (a read or write timeout, a reset or a closed connection) may
#: come after Buildkite received the request.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _never_sent(error: BuildkiteUnavailable) -> bool:
    return isinstance(error.__cause__, _NEVER_SENT)


def _slug(value: str, what: str) -> str:
    if not isinstance(value, str) or not _SLUG_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"invalid {what} slug {value!r}")
    return value


def _identifier(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def _iso8601(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _float_header(response: httpx.Response, name: str) -> float | None:
    try:
        return float(response.headers[name])
    except (KeyError, ValueError):
        return None


def _rate_limit_body(response: httpx.Response) -> tuple[str | None, float | None]:
    """The scope (``organization`` or ``user``) and ``reset`` a 429 body names, if any."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    named = body.get("scope")
    scope = _BODY_SCOPES.get(named) if isinstance(named, str) else None
    value = body.get("reset")
    reset = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return scope, reset
