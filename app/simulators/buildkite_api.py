"""The fake Buildkite's REST API v2 endpoints, each answering as Buildkite does. Part of the
sandbox's and the tests' simulator of Buildkite.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from app.simulators.buildkite_records import (
    _BUILD_FILTERS,
    _CREATE_BUILD_FIELDS,
    _META_PARAM_RE,
    BUILD_STATES,
    CANCELABLE_STATES,
    FINISHED_STATES,
    JSON,
    RETRYABLE_JOB_STATES,
    TERMINAL_STATES,
    UNFINISHED_JOB_STATES,
    _Call,
    _key,
    _now_iso,
    _parse_time,
    _Reply,
    _Route,
    _stored_time,
    _Unexpected,
)
from app.simulators.buildkite_setup import BuildkiteSetup


class BuildkiteApi(BuildkiteSetup):
    """The fake's state, answered over Buildkite's REST API v2."""

    @functools.cached_property
    def _routes(self) -> list[_Route]:
        return self._make_routes()

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
        self._cancel(build, reason="canceled via the API")
        return web.json_response(self._build_json(build))

    def _cancel(self, build: JSON, *, reason: str) -> None:
        now = _now_iso(self.now())
        build.update(state="canceled", finished_at=now, cancel_reason=reason)
        for job in build["jobs"]:
            if job.get("state") in UNFINISHED_JOB_STATES:
                job["state"], job["finished_at"] = "canceled", now
        self._sync_agents()

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
        """Connected agents only, as Buildkite lists them (one stopping after its job still is)."""
        self._check_org(call)
        q = call.query
        agents = [
            copy.deepcopy(agent)
            for agent in self.agents.values()
            if agent["connection_state"] in {"connected", "stopping"}
            and all(agent[key] == q[key] for key in ("name", "hostname", "version") if key in q)
        ]
        return self._paginated(call, agents)

    def _get_agent(self, call: _Call) -> web.StreamResponse:
        return web.json_response(copy.deepcopy(self._agent_for(call)))

    def _stop_agent(self, call: _Call) -> web.StreamResponse:
        """Buildkite's stop: only a connected agent (400 otherwise); by force (the default) its
        job and build are canceled and it stops at once, else it stops once its job is done."""
        agent = self._agent_for(call)
        body = self._json_object(call, frozenset({"force"}))
        force = body.get("force", True)  # Buildkite's default
        if not isinstance(force, bool):
            raise _Reply(422, "Validation Failed", [{"field": "force", "code": "invalid"}])
        if agent["connection_state"] != "connected":
            raise _Reply(400, "Can only stop connected agents")
        agent["stop_requested"] = {"force": force}
        agent["connection_state"] = "stopping"  # takes no new job from here on
        job = agent["job"]
        if job is None:
            now = _now_iso(self.now())
            agent.update(connection_state="stopped", stopped_at=now, disconnected_at=now)
        elif force:
            for build in self.builds:
                if any(j is job for j in build["jobs"]):
                    self._cancel(build, reason="the agent running it was stopped")
        self._sync_agents()
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
