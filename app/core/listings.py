"""What `/buildkite` reads: pages of pipelines, builds and agents, one build, the token's
identity and the health digest, with as few Buildkite requests as a page needs (each page
says what it cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Literal, TypeVar

from app.core import digest
from app.core.commands import BuildRef
from app.core.commands.admin import AgentsQuery, BuildsQuery, HealthRequest, PipelinesQuery
from app.core.errors import UserError, explain
from app.core.services import Services
from app.slack.render.admin import (
    AgentRow,
    AgentsPage,
    BuildsPage,
    PipelineRow,
    PipelinesPage,
    WhoAmI,
)
from app.slack.render.digest import Digest
from buildkite.errors import BuildkiteError, NotFound, PermissionDenied
from buildkite.models import Build, Organization, Pipeline, User

T = TypeVar("T")

PIPELINES_PER_PAGE = 10
BUILDS_PER_PAGE = 10
#: Each agent takes about 1,000 characters of blocks (two buttons, a confirm): 15 went over what
#: Slack takes in one message (msg_blocks_too_long near 13k characters).
AGENTS_PER_PAGE = 10
#: The organisation's newest builds read to find each listed pipeline's last build.
LATEST_BUILDS_READ = 100
MAX_PER_PAGE = 100

#: Every token scope the bot uses, and the features that need it (shown by whoami).
SCOPE_FEATURES: dict[str, str] = {
    "read_builds": "following builds, `/buildkite builds`, `/buildkite build`, the health digest",
    "write_builds": "deploy, cancel, rebuild, unblock and retry",
    "read_pipelines": (
        "`/buildkite pipelines`, deploy defaults (the default branch) and unblock forms "
        "(the pipeline's steps)"
    ),
    "write_pipelines": "`/buildkite pipeline create`, `update` and `delete`",
    "read_agents": "`/buildkite agents`",
    "write_agents": "the agents' Stop buttons",
    "read_build_logs": "the log tail of a failed job",
    "read_clusters": (
        "`/buildkite pipeline create` on a clustered organisation without `BUILDKITE_CLUSTER_ID` "
        "(finding its only cluster)"
    ),
    "read_organizations": "`/buildkite whoami` (the organisation)",
    "read_user": "`/buildkite whoami` (the token's owner)",
}


def pages(read: int, per_page: int) -> int:
    """Requests a listing cost: one per page read, and at least one."""
    return max(1, math.ceil(read / per_page))


async def _collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


class Listings:
    """Reads pipelines, builds and agents for a Slack user; reading needs no permission."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.bk = services.buildkite

    async def pipelines_page(self, query: PipelinesQuery) -> PipelinesPage:
        """A page of pipelines with their last build.

        Costs one request for the pipelines (for pages up to 9 without a filter; a filter reads
        100 pipelines per request until the page is full), one for the organisation's 100 newest
        builds, and one per listed pipeline that has none among them (at most 10).
        """
        size = PIPELINES_PER_PAGE
        want = query.page * size + 1  # one more than shown tells whether there is a next page
        matches: list[Pipeline] = []
        read = 0
        try:
            if query.filter is None:
                per_page = min(MAX_PER_PAGE, want)
                matches = await _collect(self.bk.list_pipelines(per_page=per_page, limit=want))
                read = len(matches)
            else:
                per_page, needle = MAX_PER_PAGE, query.filter.lower()
                async for pipeline in self.bk.list_pipelines(per_page=per_page):
                    read += 1
                    if needle in pipeline.slug or needle in pipeline.name.lower():
                        matches.append(pipeline)
                        if len(matches) >= want:
                            break
            shown = matches[(query.page - 1) * size : query.page * size]
            latest, extra = await self._latest_builds([p.slug for p in shown])
        except BuildkiteError as exc:
            raise UserError(self._explain(exc, "list the pipelines of")) from None
        rows = tuple(
            PipelineRow(p.slug, p.name, p.web_url, p.default_branch, latest.get(p.slug))
            for p in shown
        )
        return PipelinesPage(
            rows=rows,
            page=query.page,
            has_more=len(matches) > query.page * size,
            filter=query.filter,
            requests=pages(read, per_page) + extra,
        )

    async def _latest_builds(self, slugs: list[str]) -> tuple[dict[str, Build], int]:
        """The last build of each pipeline, and the requests that cost."""
        if not slugs:
            return {}, 0
        latest: dict[str, Build] = {}
        newest = await _collect(
            self.bk.list_builds(
                exclude_jobs=True, per_page=LATEST_BUILDS_READ, limit=LATEST_BUILDS_READ
            )
        )
        for build in newest:
            if build.pipeline_slug:
                latest.setdefault(build.pipeline_slug, build)
        if len(newest) < LATEST_BUILDS_READ:
            return latest, 1  # every build of the organisation was read
        missing = [slug for slug in slugs if slug not in latest]
        found = await asyncio.gather(*(self._last_build(slug) for slug in missing))
        latest.update({slug: build for slug, build in zip(missing, found, strict=True) if build})
        return latest, 1 + len(missing)

    async def _last_build(self, slug: str) -> Build | None:
        try:
            builds = await _collect(
                self.bk.list_builds(pipeline=slug, exclude_jobs=True, per_page=1, limit=1)
            )
        except NotFound:
            return None  # deleted since it was listed
        return builds[0] if builds else None

    async def builds_page(self, query: BuildsQuery) -> BuildsPage:
        """Recent builds, newest first: one request for pages up to 9."""
        want = query.page * BUILDS_PER_PAGE + 1
        per_page = min(MAX_PER_PAGE, want)
        try:
            builds = await _collect(
                self.bk.list_builds(
                    pipeline=query.pipeline,
                    state=query.state,
                    branch=query.branch,
                    exclude_jobs=True,
                    per_page=per_page,
                    limit=want,
                )
            )
        except BuildkiteError as exc:
            if query.pipeline is not None:
                raise UserError(
                    explain(exc, action="list the builds of", pipeline=query.pipeline)
                ) from None
            raise UserError(self._explain(exc, "list the builds of")) from None
        start = (query.page - 1) * BUILDS_PER_PAGE
        return BuildsPage(
            builds=tuple(builds[start : start + BUILDS_PER_PAGE]),
            page=query.page,
            has_more=len(builds) > start + BUILDS_PER_PAGE,
            pipeline=query.pipeline,
            state=query.state,
            branch=query.branch,
            requests=pages(len(builds), per_page),
        )

    async def recent_builds(
        self, *, pipeline: str | None, state: str | None, branch: str | None, limit: int
    ) -> list[Build]:
        """Up to `limit` (≤ 100) recent builds without their jobs, newest first: one request."""
        try:
            return await _collect(
                self.bk.list_builds(
                    pipeline=pipeline,
                    state=state,
                    branch=branch,
                    exclude_jobs=True,
                    per_page=min(MAX_PER_PAGE, limit),
                    limit=limit,
                )
            )
        except BuildkiteError as exc:
            if pipeline is not None:
                raise UserError(
                    explain(exc, action="list the builds of", pipeline=pipeline)
                ) from None
            raise UserError(self._explain(exc, "list the builds of")) from None

    async def build(self, ref: BuildRef, *, action: str = "read") -> Build:
        """One build with its jobs (one request); Buildkite's refusal explained for `action`
        (what the caller was about to do with it) as a UserError."""
        try:
            return await self.bk.get_build(ref.pipeline, ref.number)
        except BuildkiteError as exc:
            raise UserError(
                explain(exc, action=action, pipeline=ref.pipeline, number=ref.number)
            ) from None

    async def agents_page(self, query: AgentsQuery) -> AgentsPage:
        """Connected agents: one request for pages up to 9 without a queue; a queue filter
        reads 100 agents per request until the page is full."""
        size = AGENTS_PER_PAGE
        want = query.page * size + 1
        matches = []
        read = 0
        try:
            if query.queue is None:
                per_page = min(MAX_PER_PAGE, want)
                matches = await _collect(self.bk.list_agents(per_page=per_page, limit=want))
                read = len(matches)
            else:
                per_page = MAX_PER_PAGE
                async for agent in self.bk.list_agents(per_page=per_page):
                    read += 1
                    if agent.queue == query.queue:
                        matches.append(agent)
                        if len(matches) >= want:
                            break
        except BuildkiteError as exc:
            raise UserError(self._explain(exc, "list the agents of")) from None
        start = (query.page - 1) * size
        rows = tuple(
            AgentRow(
                id=agent.id,
                name=agent.name,
                queue=agent.queue,
                version=agent.version,
                web_url=agent.web_url,
                job_name=agent.job.display_name if agent.job else None,
                job_url=agent.job.web_url if agent.job else None,
            )
            for agent in matches[start : start + size]
        )
        return AgentsPage(
            rows=rows,
            page=query.page,
            has_more=len(matches) > start + size,
            queue=query.queue,
            requests=pages(read, per_page),
        )

    async def whoami(self) -> WhoAmI:
        """The organisation, the token's owner and scopes: three requests, no token shown."""
        try:
            token = await self.bk.get_access_token()
        except BuildkiteError as exc:
            raise UserError(self._explain(exc, "describe the API token of")) from None
        org: Organization | None = None
        user: User | None = None
        # Without read_organizations or read_user, say so instead of failing.
        with contextlib.suppress(PermissionDenied):
            org = await self.bk.get_organization()
        with contextlib.suppress(PermissionDenied):
            user = await self.bk.get_user()
        return WhoAmI(
            org_slug=self.bk.org,
            org_name=org.name if org else None,
            org_url=(org.web_url if org else None) or f"https://buildkite.com/{self.bk.org}",
            user_name=user.name if user else None,
            user_email=user.email if user else None,
            scopes=tuple(token.scopes),
            missing=tuple(
                (scope, features)
                for scope, features in SCOPE_FEATURES.items()
                if scope not in token.scopes
            ),
        )

    async def health(self, request: HealthRequest) -> Digest:
        """The build-health digest of one pipeline or all, over the last 24 hours or 7 days."""
        pipelines: Literal["all"] | list[str] = (
            "all" if request.pipeline is None else [request.pipeline]
        )
        try:
            return await digest.build_health(self.bk, pipelines=pipelines, window=request.window)
        except BuildkiteError as exc:
            if request.pipeline is not None:
                raise UserError(
                    explain(exc, action="read the builds of", pipeline=request.pipeline)
                ) from None
            raise UserError(self._explain(exc, "read the builds of")) from None

    def _explain(self, exc: BuildkiteError, action: str) -> str:
        return explain(exc, action=action, pipeline=self.bk.org, organisation=True)
