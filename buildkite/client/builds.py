"""The builds and jobs endpoints: create, find, get, cancel, rebuild and list builds; retry,
unblock and read the log of jobs."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from buildkite.client.base import ClientBase, iso8601
from buildkite.client.pagination import MAX_PER_PAGE, paginate
from buildkite.client.starts import start_build
from buildkite.models import STATE_FILTERS, Author, Build, BuildState, Job

__all__ = ["REQUEST_ID_META_KEY", "SOURCE_META_KEY", "SOURCE_META_VALUE", "BuildsAPI"]

#: Every build the bot creates carries these in its meta_data, so it can find its own builds.
REQUEST_ID_META_KEY = "chatops_request_id"
SOURCE_META_KEY = "chatops_source"
SOURCE_META_VALUE = "slack"

# How far our clock may disagree with Buildkite's when looking for a rebuild we may have made.
_CLOCK_SKEW = timedelta(minutes=2)
_META_KEY_RE = re.compile(r"[^\[\]\s&=#]+")


class BuildsAPI(ClientBase):
    """Builds and their jobs."""

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

        return await start_build(
            self._transport,
            self.start_lookup,
            "POST",
            path,
            body,
            find_created,
            request_id=request_id,
        )

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
        return await self._transport.get(self._build_path(pipeline, number), Build)

    async def cancel_build(self, pipeline: str, number: int) -> Build:
        """Cancel a scheduled, running or failing build (422 otherwise).

        https://buildkite.com/docs/apis/rest-api/builds#cancel-a-build
        """
        path = f"{self._build_path(pipeline, number)}/cancel"
        return self._transport.parse(await self._transport.request("PUT", path), Build)

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

        return await start_build(
            self._transport, self.start_lookup, "PUT", path, None, find_rebuild, request_id=None
        )

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
        path = f"{self._build_path(pipeline, number)}/retry_failed_jobs"
        await self._transport.request("PUT", path)

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
            params.append(("created_from", iso8601(created_from)))
        if finished_from is not None:
            params.append(("finished_from", iso8601(finished_from)))
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
        return paginate(self._transport, path, params, Build, per_page=per_page, limit=limit)

    # Jobs

    async def retry_job(self, pipeline: str, number: int, job_id: str) -> Job:
        """Retry a failed, timed out or canceled job; returns the new job.

        https://buildkite.com/docs/apis/rest-api/jobs#retry-a-job
        """
        path = f"{self._job_path(pipeline, number, job_id)}/retry"
        return self._transport.parse(await self._transport.request("PUT", path), Job)

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
        response = await self._transport.request("PUT", path, json=body)
        return self._transport.parse(response, Job)

    async def job_log_tail(
        self, pipeline: str, number: int, job_id: str, *, max_bytes: int = 4000
    ) -> str:
        """The last ``max_bytes`` of a job's log, as text (needs the read_build_logs scope).

        https://buildkite.com/docs/apis/rest-api/jobs#get-a-jobs-log-output
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        response = await self._transport.request(
            "GET",
            f"{self._job_path(pipeline, number, job_id)}/log",
            headers={"Range": f"bytes=-{max_bytes}", "Accept": "text/plain"},
            follow_redirects=True,
        )
        raw = response.content
        if response.headers.get("Content-Type", "").startswith("application/json"):
            data = self._transport.json(response)
            content = data.get("content") if isinstance(data, dict) else None
            raw = str(content or "").encode()
        # A byte range can start mid-character; drop what that leaves undecodable at the start.
        return raw[-max_bytes:].decode("utf-8", errors="replace").lstrip("\ufffd")
