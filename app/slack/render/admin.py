"""The /buildkite surface: pages of pipelines, builds and agents, whoami,
and the pipeline forms, deletion and change notes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ConfirmObject,
    InputBlock,
    PlainTextInputElement,
)
from slack_sdk.models.views import View

from app.slack.ids import INPUT_ACTION, ActionId, BlockId, CallbackId, agent_block_id
from app.slack.mrkdwn import code, escape, link, plain, trusted_url
from app.slack.payloads import (
    AgentButtonValue,
    AgentsPageValue,
    BuildsPageValue,
    PipelineButtonValue,
    PipelineModalMetadata,
    PipelinesPageValue,
)
from app.slack.render.answers import pipeline_form_title
from app.slack.render.common import (
    STATE_LABEL,
    Rendered,
    build_title,
    clip,
    context,
    cost,
    duration,
    more_button,
    one_section,
    section,
    state_emoji,
    state_key,
)
from buildkite.models import Build


@dataclass(frozen=True)
class PipelineRow:
    slug: str
    name: str
    web_url: str | None
    default_branch: str | None
    last_build: Build | None


@dataclass(frozen=True)
class PipelinesPage:
    rows: tuple[PipelineRow, ...]
    page: int
    has_more: bool
    filter: str | None
    #: Buildkite API requests this page cost.
    requests: int


@dataclass(frozen=True)
class BuildsPage:
    builds: tuple[Build, ...]
    page: int
    has_more: bool
    pipeline: str | None
    state: str | None
    branch: str | None
    requests: int


@dataclass(frozen=True)
class AgentRow:
    id: str
    name: str
    queue: str
    version: str | None
    web_url: str | None
    job_name: str | None = None
    job_url: str | None = None

    @property
    def busy(self) -> bool:
        return self.job_name is not None or self.job_url is not None


@dataclass(frozen=True)
class AgentsPage:
    rows: tuple[AgentRow, ...]
    page: int
    has_more: bool
    queue: str | None
    requests: int


@dataclass(frozen=True)
class WhoAmI:
    """What the bot's Buildkite token is: organisation, owner, scopes, and what it lacks."""

    org_slug: str
    org_name: str | None
    org_url: str | None
    user_name: str | None
    user_email: str | None
    scopes: tuple[str, ...]
    #: (scope, the features it gates) for each scope the bot needs but the token lacks.
    missing: tuple[tuple[str, str], ...]


def _empty(what: str, page: int) -> Rendered:
    return one_section(what + (" on this page." if page > 1 else "."))


def _build_line(build: Build, pipeline: str | None = None) -> str:
    slug = pipeline or build.pipeline_slug or "build"
    took = duration(build)
    if took is None and build.started_at is not None and not build.is_final:
        took = "running"
    key = state_key(build)
    unknown = "" if key in STATE_LABEL else f" {code(key)}"
    parts = [
        f"{state_emoji(key)}{unknown} {build_title(slug, build)}",
        code(clip(build.branch or "?", 60)),
    ]
    if took:
        parts.append(took)
    if build.message:
        parts.append(clip(plain(build.message.splitlines()[0]), 80))
    return " · ".join(parts)


def pipelines_list(page: PipelinesPage) -> Rendered:
    """A page of pipelines: slug, default branch and the state of the last build."""
    where = f" matching {code(page.filter)}" if page.filter else ""
    if not page.rows:
        return _empty(f"No pipelines{where}", page.page)
    blocks = [section(f":building_construction: *Pipelines{where}* (page {page.page})")]
    for row in page.rows:
        last = row.last_build
        state = (
            f"last build {state_emoji(state_key(last))} {build_title(row.slug, last)}"
            if last is not None
            else "no builds yet"
        )
        branch = code(clip(row.default_branch or "?", 100))
        blocks.append(section(f"*{link(row.web_url, row.slug)}* · {branch} · {state}"))
    blocks.append(context(f"This page cost {cost(page.requests)}."))
    if page.has_more:
        value = PipelinesPageValue(page=page.page + 1, filter=page.filter)
        blocks.append(more_button(ActionId.PIPELINES_MORE, value, BlockId.PIPELINES_MORE))
    return Rendered(text=f"Pipelines{where}, page {page.page}", blocks=blocks)


def builds_list(page: BuildsPage) -> Rendered:
    """A page of recent builds, newest first, with state, duration and links."""
    scope = code(page.pipeline) if page.pipeline else "all pipelines"
    filters = "".join(
        f", {what} {code(clip(value, 100))}"
        for what, value in (("state", page.state), ("branch", page.branch))
        if value
    )
    title = f"Recent builds of {scope}{filters}"
    if not page.builds:
        return _empty(f"No builds of {scope}{filters}", page.page)
    lines = [_build_line(build, page.pipeline) for build in page.builds]
    blocks = [
        section(f":scroll: *{title}* (page {page.page})\n" + "\n".join(lines)),
        context(f"This page cost {cost(page.requests)}."),
    ]
    if page.has_more:
        value = BuildsPageValue(
            page=page.page + 1, pipeline=page.pipeline, state=page.state, branch=page.branch
        )
        blocks.append(more_button(ActionId.BUILDS_MORE, value, BlockId.BUILDS_MORE))
    return Rendered(text=f"{title}, page {page.page}", blocks=blocks)


def _danger_button(
    text: str, action_id: ActionId, value: str, *, title: str, question: str, confirm: str
) -> ButtonElement:
    """A red button that asks `question` (confirm or "Keep it") before it acts."""
    return ButtonElement(
        text=text,
        action_id=action_id,
        value=value,
        style="danger",
        confirm=ConfirmObject(
            title=title, text=clip(question, 300), confirm=confirm, deny="Keep it"
        ),
    )


def _agent_buttons(row: AgentRow) -> dict[str, Any]:
    value = AgentButtonValue(id=row.id, name=clip(row.name, 100)).model_dump_json()
    return ActionsBlock(
        block_id=agent_block_id(row.id),
        elements=[
            ButtonElement(text="Stop", action_id=ActionId.AGENT_STOP, value=value),
            _danger_button(
                "Force stop",
                ActionId.AGENT_FORCE_STOP,
                value,
                title="Force-stop this agent?",
                question=f"Stop {escape(row.name)} now? Its current job is canceled.",
                confirm="Force stop",
            ),
        ],
    ).to_dict()


def agents_list(page: AgentsPage) -> Rendered:
    """A page of connected agents, each with Stop (graceful) and Force stop (confirmed)."""
    where = f" in queue {code(page.queue)}" if page.queue else ""
    if not page.rows:
        return _empty(f"No connected agents{where}", page.page)
    blocks = [section(f":robot_face: *Connected agents{where}* (page {page.page})")]
    for row in page.rows:
        if row.busy:
            job = link(row.job_url, clip(row.job_name or "a job", 100))
            status = f":large_green_circle: busy on {job}"
        else:
            status = ":white_circle: idle"
        version = f"v{escape(row.version)}" if row.version else "version ?"
        blocks.append(
            section(
                f"*{link(row.web_url, row.name)}* · queue {code(row.queue)} · {version} · {status}"
            )
        )
        blocks.append(_agent_buttons(row))
    blocks.append(
        context(
            f"This page cost {cost(page.requests)}. *Stop* lets the agent finish its job first."
        )
    )
    if page.has_more:
        more = AgentsPageValue(page=page.page + 1, queue=page.queue)
        blocks.append(more_button(ActionId.AGENTS_MORE, more, BlockId.AGENTS_MORE))
    return Rendered(text=f"Connected agents{where}, page {page.page}", blocks=blocks)


def whoami_message(who: WhoAmI) -> Rendered:
    """The organisation, the token's owner and scopes, and warnings for the missing ones."""
    org = link(who.org_url, who.org_name or who.org_slug)
    user = escape(who.user_name or "unknown (the token lacks `read_user`)")
    if who.user_email:
        user += f" ({escape(who.user_email)})"
    if who.org_name is None:
        org += " (details need the `read_organizations` scope)"
    scopes = ", ".join(code(s) for s in who.scopes) or "none"
    lines = [
        f"*Organisation:* {org} ({code(who.org_slug)})",
        f"*API token of:* {user}",
        f"*Token scopes:* {scopes}",
    ]
    if who.missing:
        lines.append(":warning: *The token lacks scopes the bot needs:*")
        lines += [f"• `{scope}`: {features}" for scope, features in who.missing]
        lines.append(
            "Add them to the token under Buildkite's *Personal Settings → API Access Tokens*."
        )
    else:
        lines.append(":white_check_mark: The token has every scope the bot uses.")
    return one_section("\n".join(lines))


def confirm_pipeline_delete(slug: str, name: str, web_url: str | None) -> Rendered:
    """The ephemeral 'are you sure?' before a pipeline is deleted."""
    value = PipelineButtonValue(pipeline=slug).model_dump_json()
    text = (
        f":warning: Delete the pipeline {link(web_url, name)} ({code(slug)}) with all its builds? "
        "This cannot be undone."
    )
    blocks = [
        section(text),
        ActionsBlock(
            block_id=BlockId.PIPELINE_DELETE,
            elements=[
                _danger_button(
                    "Delete pipeline",
                    ActionId.PIPELINE_DELETE,
                    value,
                    title="Delete this pipeline?",
                    question=f"Delete {slug} and all its builds for good?",
                    confirm="Delete",
                )
            ],
        ).to_dict(),
    ]
    return Rendered(text=f"Delete pipeline {slug}?", blocks=blocks)


def pipeline_changed(
    user: str, verb: str, slug: str, web_url: str | None, detail: str = ""
) -> Rendered:
    """The in-channel note that someone created, changed or deleted a pipeline."""
    target = link(web_url, slug) if trusted_url(web_url) else code(slug)
    extra = f" {clip(plain(detail), 500)}" if detail else ""
    return one_section(f":building_construction: <@{user}> {verb} the pipeline {target}{extra}.")


def _input(
    block_id: BlockId,
    label: str,
    initial: str | None,
    *,
    multiline: bool = False,
    optional: bool = False,
    hint: str | None = None,
) -> InputBlock:
    return InputBlock(
        block_id=block_id,
        label=label,
        element=PlainTextInputElement(
            action_id=INPUT_ACTION,
            multiline=True if multiline else None,
            initial_value=clip(initial, 3000) if initial else None,
        ),
        optional=optional,
        hint=clip(hint, 2000) if hint else None,
    )


def pipeline_modal(
    metadata: PipelineModalMetadata,
    *,
    name: str | None = None,
    repository: str | None = None,
    default_branch: str | None = None,
    description: str | None = None,
    steps: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The modal to create a pipeline (steps pasted), or to update one (metadata.pipeline)."""
    updating = metadata.pipeline is not None
    blocks: list[Block | dict[str, Any]] = []
    if error:
        blocks.append(section(f":x: {clip(escape(error), 2900)}"))
    if updating:
        blocks.append(section(f"Changing the settings of `{metadata.pipeline}`."))
    else:
        blocks.append(_input(BlockId.NAME, "Name", name, hint="The slug is derived from it."))
    blocks += [
        _input(
            BlockId.REPOSITORY,
            "Repository URL",
            repository,
            hint="e.g. git@github.com:acme/web.git",
        ),
        _input(BlockId.DEFAULT_BRANCH, "Default branch", default_branch, optional=True),
        _input(BlockId.DESCRIPTION, "Description", description, optional=True),
    ]
    if not updating:
        blocks.append(
            _input(
                BlockId.STEPS,
                "Steps (YAML)",
                steps,
                multiline=True,
                hint="A top-level `steps:` list, as in pipeline.yml.",
            )
        )
    view = View(
        type="modal",
        callback_id=CallbackId.PIPELINE_UPDATE if updating else CallbackId.PIPELINE_CREATE,
        title=pipeline_form_title(updating=updating),
        submit="Save" if updating else "Create",
        close="Cancel",
        private_metadata=metadata.model_dump_json(exclude_none=True),
        blocks=blocks,
    )
    return view.to_dict()
