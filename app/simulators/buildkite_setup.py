"""How tests and the sandbox set up and move the fake Buildkite: pipelines, agents, builds and
their states, webhooks. Part of the sandbox's and the tests' simulator of Buildkite.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import aiohttp
import yaml

from app.simulators.buildkite_records import (
    API_URL,
    BUILD_STATES,
    JSON,
    TERMINAL_STATES,
    UNFINISHED_JOB_STATES,
    _key,
    _now_iso,
    sign_webhook,
    token_webhook_headers,
    webhook_event_for,
)
from app.simulators.buildkite_state import BuildkiteState


class BuildkiteSetup(BuildkiteState):
    """The fake's state, and the methods that set it up and move builds on."""

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
            "connected_at": _now_iso(self.now()) if connection_state == "connected" else None,
            "disconnected_at": None,
            "lost_at": None,
            "stopped_at": None,
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
        self._sync_agents()
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
