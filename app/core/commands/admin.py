"""Parsing of `/buildkite` (pipelines, builds, agents, whoami, health, pipeline changes) and of
the pipeline form: pure functions from text to typed requests, like the other commands.
"""

from __future__ import annotations

import html
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.core import digest
from app.core.commands.deploy import (
    BuildRef,
    HelpRequest,
    UsageError,
    check_branch,
    check_pipeline,
    is_help,
    parse_build_ref,
    split_words,
)
from app.settings import steps_problem
from app.slack.mrkdwn import typed
from buildkite.models import STATE_FILTERS

_WINDOWS = frozenset(digest.WINDOWS)
_FILTER = re.compile(r"^[A-Za-z0-9_.-]{1,50}$")
_QUEUE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
_REPOSITORY = re.compile(r"^(https://|ssh://|git://|git@)[^\s<>|`]{3,500}$")
_UPDATE_FIELDS = ("description", "default_branch", "repository")
_UPDATE_SPLIT = re.compile(r"\s+(?=(?:" + "|".join(_UPDATE_FIELDS) + r")=)")
_QUOTES = "\"'“”‘’"  # noqa: RUF001 - Slack turns typed quotes into curly ones
MAX_DESCRIPTION = 500


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


AdminRequest = (
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


def parse_admin(text: str, *, org: str, templates: Mapping[str, str]) -> AdminRequest:
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
