"""The fake Buildkite's organization in memory: its pipelines, builds, jobs and agents, and how
they are found and made. Part of the sandbox's and the tests' simulator of Buildkite.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from aiohttp import web

from app.simulators.buildkite_records import (
    ALL_SCOPES,
    API_URL,
    JSON,
    RecordedRequest,
    _Call,
    _Fault,
    _key,
    _now_iso,
    _Reply,
    _Unexpected,
)

#: Job states in which a job holds its agent.
_ON_AN_AGENT = frozenset({"assigned", "accepted", "running", "canceling", "timing_out"})


class BuildkiteState:
    """An in-memory Buildkite organization: what the fake serves and tests set up."""

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
        #: Agents by id. A running script job takes an idle connected agent when there is one
        #: (the job's ``agent``, the agent's ``job``); an agent stopping gracefully stops once its
        #: job is done.
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

    def build(self, slug: str, number: int) -> JSON:
        """The live dict of a build (KeyError if there is none)."""
        for build in self.builds:
            if build["pipeline"]["slug"] == slug and build["number"] == number:
                return build
        raise KeyError(f"no build {slug}#{number}")

    def builds_of(self, slug: str) -> list[JSON]:
        """The builds of one pipeline, oldest first."""
        return [build for build in self.builds if build["pipeline"]["slug"] == slug]

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

    def idle_agents(self) -> list[JSON]:
        """Connected agents without a job, by name: those a job can start on."""
        idle = [a for a in self.agents.values() if a.get("connection_state") == "connected"]
        return sorted((a for a in idle if a.get("job") is None), key=lambda a: str(a["name"]))

    def _sync_agents(self) -> None:
        """After jobs moved: free the agents whose job is done (an agent asked to stop then
        stops), and put running jobs that have none on idle agents."""
        now = _now_iso(self.now())
        for agent in self.agents.values():
            job = agent.get("job")
            if job is None or job.get("state") in _ON_AN_AGENT:
                continue
            agent.update(job=None, last_job_finished_at=now)
            if agent.get("connection_state") == "stopping":
                agent.update(connection_state="stopped", stopped_at=now, disconnected_at=now)
        if not self.agents:
            return  # an organization without agents: jobs run unattended, as tests set them
        idle = self.idle_agents()
        for build in self.builds:
            for job in build["jobs"]:
                if not idle:
                    return
                running = job.get("type") == "script" and job.get("state") in _ON_AN_AGENT
                if running and not job.get("agent"):
                    agent = idle.pop(0)
                    job["agent"] = {k: copy.deepcopy(v) for k, v in agent.items() if k != "job"}
                    agent["job"] = job  # the live job: the agent's JSON shows its state

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
