"""The /buildkite operator surface: what people type (parsed, pure) and the service behind it.

Pipelines, builds, agents and the token's identity, read with as few Buildkite requests as a
page needs (each page says what it cost). Pipeline changes are for admins; stopping agents for
admins and the policy's `agent_stoppers`. Every change is audited, allowed or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import re
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisError

from app.core import digest
from app.core.commands import (
    BuildRef,
    HelpRequest,
    UsageError,
    check_branch,
    check_pipeline,
    is_help,
    parse_build_ref,
    split_words,
)
from app.core.errors import UserError
from app.core.operations import TRACKING_DOWN, Services, explain
from app.core.policy import principal_ref
from app.settings import steps_problem
from app.slack.actor import Actor
from app.slack.mrkdwn import typed
from app.slack.outbox import SlackDeliveryError
from app.slack.payloads import AgentButtonValue
from app.slack.render.admin import (
    AgentRow,
    AgentsPage,
    BuildsPage,
    PipelineRow,
    PipelinesPage,
    WhoAmI,
    pipeline_changed,
)
from app.slack.render.common import Rendered
from app.slack.render.digest import Digest
from app.storage.store import ACTION_TTL, REQUEST_TTL
from buildkite.errors import BuildkiteError, NotFound, PermissionDenied, ValidationFailed
from buildkite.models import STATE_FILTERS, Build, Organization, Pipeline, User

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

_WINDOWS = frozenset(digest.WINDOWS)
_FILTER = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
_QUEUE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
_REPOSITORY = re.compile(r"^(https://|ssh://|git://|git@)[^\s<>|`]{3,500}$")
_UPDATE_FIELDS = ("description", "default_branch", "repository")
_UPDATE_SPLIT = re.compile(r"\s+(?=(?:" + "|".join(_UPDATE_FIELDS) + r")=)")
_QUOTES = "\"'“”‘’"  # noqa: RUF001 - Slack turns typed quotes into curly ones
MAX_DESCRIPTION = 500


log = logging.getLogger(__name__)

_NAME_A_CLUSTER = (
    "Could not create *{name}*: this Buildkite organization uses clusters, and the bot does not "
    "know which one a new pipeline joins. Set `BUILDKITE_CLUSTER_ID` (or a `cluster_id` in the "
    "pipeline template) to the cluster's id."
)


def _about_cluster(exc: BuildkiteError) -> bool:
    """Buildkite refused a pipeline for want of a cluster."""
    if not isinstance(exc, ValidationFailed):
        return False
    named = [str(error.get("field", "")) for error in exc.errors] + [exc.message]
    return any("cluster" in text.lower() for text in named)


def usage(templates: Collection[str] = ()) -> str:
    """The help of /buildkite: every subcommand with an example."""
    known = ", ".join(f"`{name}`" for name in sorted(templates)) or "none configured"
    return (
        "*Usage:* `/buildkite <subcommand>`\n"
        "• `/buildkite pipelines [filter]`: pipelines with their default branch and last build\n"
        "      e.g. `/buildkite pipelines web`\n"
        "• `/buildkite pipeline create <name> <repository URL> [template]` (admins); without a "
        f"template, a form to paste the steps in. Templates: {known}\n"
        "      e.g. `/buildkite pipeline create web git@github.com:acme/web.git default`\n"
        "• `/buildkite pipeline update <slug> [description=…] [default_branch=…] "
        "[repository=…]` (admins); without fields, a form\n"
        "      e.g. `/buildkite pipeline update web default_branch=trunk`\n"
        "• `/buildkite pipeline delete <slug>` (admins; asks first)\n"
        "      e.g. `/buildkite pipeline delete old-service`\n"
        "• `/buildkite builds [pipeline|all] [state] [branch]`: recent builds\n"
        "      e.g. `/buildkite builds deploy-prod failed main`, `/buildkite builds all running`\n"
        "• `/buildkite build <pipeline> <number>` or `/buildkite build <build URL>`: one build "
        "and its jobs\n"
        "      e.g. `/buildkite build deploy-prod 1234`\n"
        "• `/buildkite agents [queue]`: connected agents, with Stop buttons (admins and "
        "`agent_stoppers`)\n"
        "      e.g. `/buildkite agents deploy`\n"
        "• `/buildkite whoami`: the organisation, the API token's owner and scopes\n"
        "• `/buildkite health [pipeline|all] [24h|7d]`: pass rate, durations, failures, flaky\n"
        "      e.g. `/buildkite health all 7d`"
    )


# -- what people type --------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelinesQuery:
    filter: str | None = None
    page: int = 1


@dataclass(frozen=True)
class BuildsQuery:
    pipeline: str | None = None
    state: str | None = None
    branch: str | None = None
    page: int = 1


@dataclass(frozen=True)
class AgentsQuery:
    queue: str | None = None
    page: int = 1


@dataclass(frozen=True)
class WhoamiRequest:
    pass


@dataclass(frozen=True)
class HealthRequest:
    pipeline: str | None = None  # None: every pipeline
    window: str = "24h"


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline to create, complete and checked."""

    name: str
    repository: str
    steps: str
    default_branch: str | None = None
    description: str | None = None
    template: str | None = None


@dataclass(frozen=True)
class PipelineForm:
    """Open the form to create a pipeline (with what was typed) or to update `pipeline`."""

    pipeline: str | None = None
    name: str | None = None
    repository: str | None = None


@dataclass(frozen=True)
class PipelineUpdate:
    pipeline: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineDelete:
    pipeline: str


OperatorRequest = (
    HelpRequest
    | PipelinesQuery
    | BuildsQuery
    | BuildRef
    | AgentsQuery
    | WhoamiRequest
    | HealthRequest
    | PipelineSpec
    | PipelineForm
    | PipelineUpdate
    | PipelineDelete
)


def parse_operator(text: str, *, org: str, templates: Mapping[str, str]) -> OperatorRequest:
    """Parse what follows `/buildkite`; a mistake raises UsageError saying how to fix it."""
    words = split_words(text)
    if is_help(words):
        return HelpRequest()
    sub, args = words[0].lower(), words[1:]
    if sub == "pipelines":
        return PipelinesQuery(
            filter=_one(args, _FILTER, "a filter", "/buildkite pipelines [filter]")
        )
    if sub == "pipeline":
        return _parse_pipeline(text, args, templates)
    if sub == "builds":
        return _parse_builds(args)
    if sub == "build":
        ref = parse_build_ref(
            " ".join(args), org=org, usage="Usage: `/buildkite build <pipeline> <number>`"
        )
        if isinstance(ref, HelpRequest):
            raise UsageError("Usage: `/buildkite build <pipeline> <number>` or a build URL.")
        return ref
    if sub == "agents":
        return AgentsQuery(queue=_one(args, _QUEUE, "a queue name", "/buildkite agents [queue]"))
    if sub == "whoami":
        if args:
            raise UsageError("Usage: `/buildkite whoami` (it takes nothing more).")
        return WhoamiRequest()
    if sub == "health":
        return _parse_health(args)
    raise UsageError(f"`{typed(words[0])}` is not a /buildkite subcommand.")


def _one(args: list[str], pattern: re.Pattern[str], what: str, usage_line: str) -> str | None:
    if not args:
        return None
    if len(args) > 1 or not pattern.match(args[0]):
        raise UsageError(f"Expected at most {what}. Usage: `{usage_line}`")
    return args[0]


def _parse_builds(args: list[str]) -> BuildsQuery:
    pipeline: str | None = None
    state: str | None = None
    branch: str | None = None
    pipeline_given = False
    for word in args:
        if word.lower() in STATE_FILTERS and state is None:
            state = word.lower()
        elif not pipeline_given:
            pipeline_given = True
            pipeline = None if word.lower() == "all" else check_pipeline(word)
        elif branch is None:
            branch = check_branch(word)
        else:
            raise UsageError("Usage: `/buildkite builds [pipeline|all] [state] [branch]`")
    return BuildsQuery(pipeline=pipeline, state=state, branch=branch)


def builds_query(
    pipeline: str | None, state: str | None, branch: str | None, page: int
) -> BuildsQuery:
    """A builds query carried by a button, checked like a typed one."""
    if state is not None and state not in STATE_FILTERS:
        raise UsageError(f"`{typed(state)}` is not a build state.")
    return BuildsQuery(
        pipeline=check_pipeline(pipeline) if pipeline else None,
        state=state,
        branch=check_branch(branch) if branch else None,
        page=page,
    )


def _parse_health(args: list[str]) -> HealthRequest:
    pipeline: str | None = None
    window = "24h"
    if len(args) > 2:
        raise UsageError("Usage: `/buildkite health [pipeline|all] [24h|7d]`")
    for word in args:
        if word.lower() in _WINDOWS:
            window = word.lower()
        elif word.lower() != "all":
            pipeline = check_pipeline(word)
    return HealthRequest(pipeline=pipeline, window=window)


def _parse_pipeline(
    text: str, args: list[str], templates: Mapping[str, str]
) -> PipelineSpec | PipelineForm | PipelineUpdate | PipelineDelete:
    action = args[0].lower() if args else ""
    rest = args[1:]
    if action == "create":
        if len(rest) > 3:
            raise UsageError(
                "Usage: `/buildkite pipeline create <name> <repository URL> [template]` "
                "(the name is one word here; the form takes spaces)."
            )
        name = check_name(rest[0]) if rest else None
        repository = check_repository(rest[1]) if len(rest) > 1 else None
        if len(rest) < 3:
            return PipelineForm(name=name, repository=repository)
        template = rest[2]
        if template not in templates:
            known = ", ".join(f"`{t}`" for t in sorted(templates)) or "none are configured"
            raise UsageError(
                f"There is no pipeline template `{typed(template)}` (templates: {known}). "
                "Leave it out to paste the steps in a form."
            )
        assert name is not None and repository is not None
        return PipelineSpec(name, repository, templates[template], template=template)
    if action == "update":
        if not rest:
            raise UsageError("Usage: `/buildkite pipeline update <slug> [field=value…]`")
        slug = check_pipeline(rest[0])
        # The fields are cut from the whole text, so that a description may hold spaces.
        parts = html.unescape(text).split(maxsplit=3)
        return PipelineUpdate(slug, parse_update_fields(parts[3] if len(parts) > 3 else ""))
    if action == "delete":
        if len(rest) != 1:
            raise UsageError("Usage: `/buildkite pipeline delete <slug>`")
        return PipelineDelete(check_pipeline(rest[0]))
    raise UsageError("Usage: `/buildkite pipeline create|update|delete …` (see `/buildkite help`).")


def parse_update_fields(text: str) -> dict[str, str]:
    """`description=Our web app default_branch=trunk` -> the fields, each checked."""
    fields: dict[str, str] = {}
    for part in _UPDATE_SPLIT.split(text.strip()) if text.strip() else []:
        key, sep, value = part.partition("=")
        if not sep or key not in _UPDATE_FIELDS:
            raise UsageError(
                f"`{typed(part)}` is not a field to change: use "
                + ", ".join(f"`{f}=…`" for f in _UPDATE_FIELDS)
                + "."
            )
        fields[key] = check_field(key, value.strip().strip(_QUOTES))
    return fields


def check_name(name: str) -> str:
    name = name.strip()
    if not _PIPELINE_NAME.match(name):
        raise UsageError(
            f"`{typed(name)}` is not a pipeline name: letters, digits, spaces, `.`, `_` and `-`, "
            "starting with a letter or digit."
        )
    return name


def check_repository(url: str) -> str:
    url = url.strip()
    if not _REPOSITORY.match(url):
        raise UsageError(
            f"`{typed(url)}` is not a repository URL (e.g. `git@github.com:acme/web.git` or "
            "`https://github.com/acme/web.git`)."
        )
    return url


def check_field(key: str, value: str) -> str:
    if key == "repository":
        return check_repository(value)
    if key == "default_branch":
        if not value:
            raise UsageError("The default branch cannot be empty.")
        return check_branch(value)
    if len(value) > MAX_DESCRIPTION:
        raise UsageError(f"The description is too long (at most {MAX_DESCRIPTION} characters).")
    return value


class FormErrors(Exception):
    """What is wrong in a submitted form, by block id (shown by Slack under each field)."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__(str(errors))


def form_value(values: Mapping[str, Any], block_id: str) -> str:
    state = (values.get(block_id) or {}).get("value") or {}
    return str(state.get("value") or "").strip()


def parse_pipeline_form(
    values: Mapping[str, Any], *, updating: bool
) -> PipelineSpec | dict[str, str]:
    """The submitted pipeline form: a spec to create, or the fields to update."""
    errors: dict[str, str] = {}
    checked: dict[str, str] = {}
    names = ["repository", "default_branch", "description"] + ([] if updating else ["name"])
    for block_id in names:
        raw = form_value(values, block_id)
        if not raw and block_id in {"default_branch", "description"}:
            continue
        try:
            checked[block_id] = (
                check_name(raw) if block_id == "name" else check_field(block_id, raw)
            )
        except UsageError as exc:
            errors[block_id] = str(exc).replace("`", "")
    if updating:
        if errors:
            raise FormErrors(errors)
        return checked
    steps = form_value(values, "steps")
    if problem := steps_problem(steps):
        errors["steps"] = f"The steps are {problem}."
    if errors:
        raise FormErrors(errors)
    return PipelineSpec(
        name=checked["name"],
        repository=checked["repository"],
        steps=steps,
        default_branch=checked.get("default_branch"),
        description=checked.get("description"),
    )


# -- the service ---------------------------------------------------------------------------------


def pages(read: int, per_page: int) -> int:
    """Requests a listing cost: one per page read, and at least one."""
    return max(1, math.ceil(read / per_page))


async def _collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


class Operator:
    """Reads and changes pipelines and agents for a Slack user, within the policy."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.bk = services.buildkite

    # -- who may ----------------------------------------------------------------------------

    async def require_admin(self, actor: Actor, what: str, *, action: str, pipeline: str) -> None:
        """Refuse unless `actor` is an admin; with no admins configured, refuse and say how."""
        policy = self.s.policy
        if not policy.admins:
            await self._audit(actor, action, pipeline, "refused", detail="no admins configured")
            raise UserError(
                f":no_entry: Only admins may {what}, and the deploy policy names none. Add Slack "
                f"user ids (U…) or user groups (S…) under `admins:` in the policy file "
                f"(`{policy.source}`, see POLICY_FILE) and restart the bot."
            )
        if not await policy.is_admin(actor.user_id, self.s.directory.usergroup_members):
            await self._audit(actor, action, pipeline, "refused", detail="not an admin")
            who = ", ".join(principal_ref(p) for p in policy.admins)
            raise UserError(f":no_entry: Only admins may {what}: {who}.")

    async def _require_agent_stopper(self, actor: Actor, action: str, detail: str) -> None:
        policy = self.s.policy
        stoppers = policy.data.agent_stoppers or []
        allowed = [*policy.admins, *stoppers]
        if not allowed:
            await self._audit(actor, action, "", "refused", detail=f"{detail}; nobody may")
            raise UserError(
                ":no_entry: Only admins and the policy's `agent_stoppers` may stop agents, and "
                "the deploy policy names neither. Add Slack user ids (U…) or user groups (S…) "
                f"under `admins:` or `agent_stoppers:` in the policy file (`{policy.source}`, see "
                "POLICY_FILE) and restart the bot."
            )
        if actor.user_id not in await policy.members(allowed, self.s.directory.usergroup_members):
            await self._audit(actor, action, "", "refused", detail=detail)
            who = ", ".join(principal_ref(p) for p in allowed)
            raise UserError(f":no_entry: Only these may stop agents: {who}.")

    # -- reading ----------------------------------------------------------------------------

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

    async def build(self, ref: BuildRef) -> Build:
        """One build with its jobs (one request)."""
        try:
            return await self.bk.get_build(ref.pipeline, ref.number)
        except BuildkiteError as exc:
            raise UserError(
                explain(exc, action="read", pipeline=ref.pipeline, number=ref.number)
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

    # -- changing pipelines -----------------------------------------------------------------

    async def create_pipeline(
        self, spec: PipelineSpec, actor: Actor, *, request_id: str
    ) -> tuple[Pipeline, bool]:
        """Create a pipeline (once per request) and say so in the channel.

        Returns the pipeline, and whether the channel was told.
        """
        await self.require_admin(
            actor, "create pipelines", action="pipeline create", pipeline=spec.name
        )
        await self._claim(request_id, actor.user_id, REQUEST_TTL)
        extra = {
            key: value
            for key, value in (
                ("default_branch", spec.default_branch),
                ("description", spec.description),
            )
            if value
        }
        try:
            cluster_id = await self._cluster_for(spec)
        except UserError:
            await self._release(request_id)
            raise
        try:
            pipeline = await self.bk.create_pipeline(
                name=spec.name,
                repository=spec.repository,
                configuration=spec.steps,
                cluster_id=cluster_id,
                **extra,
            )
        except BuildkiteError as exc:
            await self._release(request_id)
            if cluster_id is None and _about_cluster(exc):
                await self._audit(actor, "pipeline create", spec.name, "failed", detail=str(exc))
                raise UserError(_NAME_A_CLUSTER.format(name=spec.name)) from None
            await self._audit(actor, "pipeline create", spec.name, "failed", detail=str(exc))
            raise UserError(self._explain_change(exc, "create", spec.name)) from None
        detail = f"from the template `{spec.template}`" if spec.template else ""
        await self._audit(actor, "pipeline create", pipeline.slug, "created", detail=detail)
        told = await self._announce(
            actor.channel_id,
            pipeline_changed(actor.user_id, "created", pipeline.slug, pipeline.web_url, detail),
        )
        return pipeline, told

    async def _cluster_for(self, spec: PipelineSpec) -> str | None:
        """The cluster a new pipeline joins: its template's, else BUILDKITE_CLUSTER_ID, else
        the organization's only cluster; None on an organization without clusters."""
        settings = self.s.settings
        if spec.template and (chosen := settings.pipeline_template_clusters.get(spec.template)):
            return chosen
        if settings.buildkite_cluster_id:
            return settings.buildkite_cluster_id
        try:
            clusters = await self.bk.list_clusters()
        except BuildkiteError as exc:
            # Without read_clusters the bot cannot tell; Buildkite says so if one was needed.
            log.info("could not list the organization's clusters: %s", exc)
            return None
        if len(clusters) == 1:
            return clusters[0].id
        if clusters:
            raise UserError(_NAME_A_CLUSTER.format(name=spec.name))
        return None

    async def pipeline_for_update(self, slug: str, actor: Actor) -> Pipeline:
        """The pipeline whose form an admin is about to open."""
        await self.require_admin(actor, "change pipelines", action="pipeline update", pipeline=slug)
        try:
            return await self.bk.get_pipeline(slug)
        except BuildkiteError as exc:
            raise UserError(explain(exc, action="read", pipeline=slug)) from None

    async def update_pipeline(
        self, slug: str, fields: Mapping[str, str], actor: Actor
    ) -> tuple[Pipeline, bool]:
        """Change a pipeline's description, default branch or repository."""
        await self.require_admin(actor, "change pipelines", action="pipeline update", pipeline=slug)
        if not fields:
            raise UserError(
                "Nothing to change: give `field=value` words, or leave them out for a form."
            )
        try:
            pipeline = await self.bk.update_pipeline(slug, **fields)
        except BuildkiteError as exc:
            await self._audit(actor, "pipeline update", slug, "failed", detail=str(exc))
            raise UserError(self._explain_change(exc, "update", slug)) from None
        changed = ", ".join(f"{key}={value}" for key, value in fields.items())
        await self._audit(actor, "pipeline update", slug, "updated", detail=changed)
        told = await self._announce(
            actor.channel_id,
            pipeline_changed(actor.user_id, "changed", slug, pipeline.web_url, f"({changed})"),
        )
        return pipeline, told

    async def pipeline_to_delete(self, slug: str, actor: Actor) -> Pipeline:
        """Check, before asking for confirmation, that the pipeline exists and may be deleted."""
        await self.require_admin(actor, "delete pipelines", action="pipeline delete", pipeline=slug)
        try:
            return await self.bk.get_pipeline(slug)
        except BuildkiteError as exc:
            raise UserError(explain(exc, action="read", pipeline=slug)) from None

    async def delete_pipeline(self, slug: str, actor: Actor) -> bool:
        """Delete a pipeline once its deletion was confirmed; says whether the channel was told."""
        await self.require_admin(actor, "delete pipelines", action="pipeline delete", pipeline=slug)
        request_id = f"pipeline-delete:{slug}"
        await self._claim(request_id, actor.user_id, ACTION_TTL)
        try:
            await self.bk.delete_pipeline(slug)
        except BuildkiteError as exc:
            await self._release(request_id)
            await self._audit(actor, "pipeline delete", slug, "failed", detail=str(exc))
            raise UserError(self._explain_change(exc, "delete", slug)) from None
        await self._audit(actor, "pipeline delete", slug, "deleted")
        return await self._announce(
            actor.channel_id, pipeline_changed(actor.user_id, "deleted", slug, None)
        )

    # -- agents -----------------------------------------------------------------------------

    async def stop_agent(self, agent: AgentButtonValue, actor: Actor, *, force: bool) -> None:
        """Stop an agent: gracefully (its job finishes first), or by force (its job is canceled)."""
        action = "agent force stop" if force else "agent stop"
        detail = f"agent {agent.name} ({agent.id})"
        await self._require_agent_stopper(actor, action, detail)
        request_id = f"agent-stop:{agent.id}:{force}"
        await self._claim(request_id, actor.user_id, ACTION_TTL)
        try:
            await self.bk.stop_agent(agent.id, force=force)
        except BuildkiteError as exc:
            await self._release(request_id)
            await self._audit(actor, action, "", "failed", detail=f"{detail}: {exc}")
            if isinstance(exc, NotFound):
                raise UserError(
                    f"The agent `{typed(agent.name)}` is not connected any more; nothing to stop."
                ) from None
            verb = "force-stop" if force else "stop"
            raise UserError(explain(exc, action=verb, pipeline=agent.name)) from None
        await self._audit(actor, action, "", "requested", detail=detail)

    # -- plumbing ---------------------------------------------------------------------------

    async def _announce(self, channel: str, rendered: Rendered) -> bool:
        try:
            await self.s.outbox.post(channel, rendered)
        except SlackDeliveryError:
            return False
        return True

    async def _claim(self, request_id: str, user_id: str, ttl: int) -> None:
        try:
            first = await self.s.store.claim_request(request_id, user_id, ttl=ttl)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if first is not None:
            who = "You" if first == user_id else f"<@{first}>"
            raise UserError(
                f":hourglass_flowing_sand: {who} already asked for this a moment ago; "
                "it is being handled."
            )

    async def _release(self, request_id: str) -> None:
        with contextlib.suppress(RedisError):
            await self.s.store.release_request(request_id)

    async def _audit(
        self, actor: Actor, action: str, pipeline: str, outcome: str, *, detail: str = ""
    ) -> None:
        await self.s.auditor.record(
            user=actor.user_id,
            action=action,
            pipeline=pipeline,
            channel=actor.channel_id,
            outcome=outcome,
            detail=detail,
        )

    def _explain(self, exc: BuildkiteError, action: str) -> str:
        return explain(exc, action=action, pipeline=self.bk.org).replace(
            f"Pipeline `{self.bk.org}` was not found", f"Organisation `{self.bk.org}` was not found"
        )

    @staticmethod
    def _explain_change(exc: BuildkiteError, verb: str, pipeline: str) -> str:
        return explain(exc, action=f"{verb} the pipeline", pipeline=pipeline)
