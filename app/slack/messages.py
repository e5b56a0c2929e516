"""Block Kit renderers: pure functions from typed models to the JSON posted to Slack.

Every message the bot writes is built here, so a test can assert on its exact JSON, and every
user-supplied string is escaped and clipped to Block Kit's limits here, once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ConfirmObject,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from app.core.unblock_forms import BlockForm, FormField, Option

# Re-exported: every caller escapes and links through the rendering module.
from app.slack.mrkdwn import code as code
from app.slack.mrkdwn import escape as escape
from app.slack.mrkdwn import link as link
from app.slack.mrkdwn import plain as plain
from app.slack.mrkdwn import preformatted as preformatted
from app.slack.mrkdwn import trusted_url as trusted_url
from app.storage.records import AuditEntry, PipelineLock
from buildkite.models import Build, BuildState, Job

SECTION_TEXT_LIMIT = 3000
FIELD_TEXT_LIMIT = 2000
MAX_FAILED_JOBS_LISTED = 10


class ActionId(StrEnum):
    """The action_id of every button the bot renders."""

    CANCEL = "build_cancel"
    REBUILD = "build_rebuild"
    OPEN = "build_open"
    UNBLOCK = "build_unblock"
    RETRY_FAILED = "build_retry_failed"
    CONFIRM_DEPLOY = "deploy_confirm"
    ABORT_DEPLOY = "deploy_abort"
    APPROVE = "approval_approve"
    REJECT = "approval_reject"
    PIPELINES_MORE = "pipelines_more"
    BUILDS_MORE = "builds_more"
    AGENTS_MORE = "agents_more"
    AGENT_STOP = "agent_stop"
    AGENT_FORCE_STOP = "agent_force_stop"
    PIPELINE_DELETE = "pipeline_delete"


@dataclass(frozen=True)
class BlockStep:
    """The block step a build waits on."""

    job_id: str
    label: str


@dataclass(frozen=True)
class LogTail:
    """The end of the first failed job's log, or why it could not be read."""

    job: Job
    text: str | None
    missing_scope: str | None = None


class RequestButtonValue(BaseModel):
    """What confirmation and approval buttons carry: the id of the request kept in Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[0-9a-f]{16,64}$")


class BuildButtonValue(BaseModel):
    """What a build button carries in its `value`: validated again when clicked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,99}$")
    number: int = Field(gt=0, lt=10**9)


class UnblockButtonValue(BuildButtonValue):
    """The Unblock button: which build and which block step (job)."""

    job: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class Rendered:
    """A message ready for chat.postMessage / chat.update: fallback text plus blocks."""

    text: str
    blocks: list[dict[str, Any]]

    def digest(self) -> str:
        """A short fingerprint of the content, to skip edits that would change nothing."""
        data = json.dumps([self.text, self.blocks], sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:16]


STATE_EMOJI: dict[str, str] = {
    "creating": ":hourglass_flowing_sand:",
    "scheduled": ":hourglass_flowing_sand:",
    "running": ":arrow_forward:",
    "failing": ":warning:",
    "passed": ":white_check_mark:",
    "failed": ":x:",
    "blocked": ":double_vertical_bar:",
    "canceling": ":no_entry_sign:",
    "canceled": ":no_entry_sign:",
    "skipped": ":fast_forward:",
    "not_run": ":heavy_minus_sign:",
}

STATE_LABEL: dict[str, str] = {
    "creating": "Creating",
    "scheduled": "Scheduled",
    "running": "Running",
    "failing": "Failing",
    "passed": "Passed",
    "failed": "Failed",
    "blocked": "Waiting on a block step",
    "canceling": "Canceling",
    "canceled": "Canceled",
    "skipped": "Skipped",
    "not_run": "Not run",
}


def clip(text: str, limit: int) -> str:
    """Cut to `limit` characters, without splitting an escaped entity like `&amp;`."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    amp = cut.rfind("&")
    if amp != -1 and ";" not in cut[amp:] and len(cut) - amp < 6:
        cut = cut[:amp]
    return cut + "…"


def state_emoji(key: str) -> str:
    """The emoji of a state key; a state this code does not know gets a question mark."""
    return STATE_EMOJI.get(key, ":grey_question:")


def state_label(key: str) -> str:
    """The label of a state key; a state this code does not know is shown as Buildkite sent it."""
    return STATE_LABEL.get(key) or escape(key)


def state_key(build: Build) -> str:
    return "blocked" if build.is_waiting_on_block and not build.is_final else build.state.value


def state_text(build: Build) -> str:
    key = state_key(build)
    return f"{state_emoji(key)} {state_label(key)}"


def short_commit(commit: str | None) -> str:
    if not commit:
        return "HEAD"
    return commit if commit == "HEAD" else commit[:7]


def duration(build: Build) -> str | None:
    start: datetime | None = build.started_at or build.created_at
    end = build.finished_at
    if start is None or end is None:
        return None
    seconds = max(0, int((end - start).total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def _title(pipeline: str, build: Build) -> str:
    return link(build.web_url, f"{pipeline} #{build.number}")


def _trigger(build: Build) -> str:
    person = build.author or build.creator
    who = escape(clip(person.name, 80)) if person and person.name else "Buildkite"
    source = {
        "webhook": "a push",
        "schedule": "a schedule",
        "ui": "the web UI",
        "api": "the API",
        "trigger_job": "a trigger step",
    }.get(build.source or "", build.source or "")
    return f"{who} (via {source})" if source else who


def build_message(
    pipeline: str, build: Build, requester: str | None, *, block: BlockStep | None = None
) -> Rendered:
    """The one message per build and channel, updated in place on every state change.

    `requester` is who asked from Slack; a build announced by routing shows who triggered it.
    """
    value = BuildButtonValue(pipeline=pipeline, number=build.number).model_dump_json()
    title = _title(pipeline, build)
    fields = [
        f"*State*\n{state_text(build)}",
        f"*Branch*\n{code(clip(build.branch or '?', 200))}",
        f"*Commit*\n{code(short_commit(build.commit))}",
        f"*Requested by*\n<@{requester}>" if requester else f"*Triggered by*\n{_trigger(build)}",
    ]
    took = duration(build)
    if took and build.is_final:
        fields.append(f"*Duration*\n{took}")
    blocks: list[dict[str, Any]] = [
        SectionBlock(
            text=MarkdownTextObject(text=f"*{title}*"),
            fields=[MarkdownTextObject(text=clip(f, FIELD_TEXT_LIMIT)) for f in fields],
        ).to_dict()
    ]
    if build.message:
        blocks.append(
            ContextBlock(
                elements=[MarkdownTextObject(text=clip(plain(build.message), SECTION_TEXT_LIMIT))]
            ).to_dict()
        )
    buttons = []
    if block is not None and not build.is_final:
        unblock = UnblockButtonValue(pipeline=pipeline, number=build.number, job=block.job_id)
        buttons.append(
            ButtonElement(
                text=clip(f"Unblock: {block.label}", 75),
                action_id=ActionId.UNBLOCK,
                value=unblock.model_dump_json(),
                style="primary",
            )
        )
    if not build.is_final and build.state not in {BuildState.CANCELING}:
        buttons.append(
            ButtonElement(
                text="Cancel",
                action_id=ActionId.CANCEL,
                value=value,
                style="danger",
                confirm=ConfirmObject(
                    title="Cancel this build?",
                    text=f"Cancel {escape(pipeline)} #{build.number}?",
                    confirm="Cancel build",
                    deny="Keep it running",
                ),
            )
        )
    if build.is_final:
        buttons.append(ButtonElement(text="Rebuild", action_id=ActionId.REBUILD, value=value))
    if build.is_final and build.state is BuildState.FAILED:
        buttons.append(
            ButtonElement(text="Retry failed jobs", action_id=ActionId.RETRY_FAILED, value=value)
        )
    web_url = trusted_url(build.web_url)
    if web_url:
        buttons.append(
            ButtonElement(text="Open in Buildkite", action_id=ActionId.OPEN, url=web_url)
        )
    blocks.append(ActionsBlock(block_id="build_actions", elements=buttons).to_dict())
    text = f"{escape(pipeline)} #{build.number}: {state_label(state_key(build))}"
    return Rendered(text=text, blocks=blocks)


def running_reply(pipeline: str, build: Build) -> Rendered:
    text = f":arrow_forward: {_title(pipeline, build)} started running."
    return _section(text)


def failing_reply(pipeline: str, build: Build) -> Rendered:
    text = f":warning: {_title(pipeline, build)} is failing: a job has failed, others still run."
    return _section(text)


def final_reply(
    pipeline: str,
    build: Build,
    mention: str | None,
    failed_jobs: list[Job] | None = None,
    *,
    log_tail: LogTail | None = None,
    after_retry: bool = False,
) -> Rendered:
    """The thread reply at a build's final state; it mentions whoever asked (or the author)."""
    label = state_label(build.state.value).lower()
    if after_retry:
        label += " after retry"
    took = duration(build)
    when = f" in {took}" if took else ""
    who = f"<@{mention}> " if mention else ""
    text = f"{who}{state_emoji(build.state.value)} {_title(pipeline, build)} {label}{when}."
    if build.state is BuildState.FAILED and failed_jobs:
        listed = failed_jobs[:MAX_FAILED_JOBS_LISTED]
        lines = [f"• {link(job.web_url, clip(job.display_name, 150))}" for job in listed]
        if len(failed_jobs) > len(listed):
            lines.append(f"• …and {len(failed_jobs) - len(listed)} more")
        text += "\n*Failed jobs:*\n" + "\n".join(lines)
    blocks = [SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict()]
    if log_tail is not None:
        blocks.append(_log_block(log_tail))
    return Rendered(text=clip(text, SECTION_TEXT_LIMIT), blocks=blocks)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b_bk;[^\x07]*\x07|\r")
LOG_TAIL_LINES = 25


def clean_log(text: str, *, max_lines: int = LOG_TAIL_LINES, limit: int = 2800) -> str:
    """The last lines of a job log, without terminal escapes, fit for a code block."""
    # A triple backtick in the log would end the code block early.
    lines = _ANSI.sub("", text).replace("```", "'''").splitlines()
    tail = "\n".join(lines[-max_lines:])
    if len(tail) > limit:
        tail = "…" + tail[-(limit - 1) :]
    return tail


def _log_block(tail: LogTail) -> dict[str, Any]:
    name = clip(tail.job.display_name, 100)
    if tail.text is None:
        note = (
            f"The log of {link(tail.job.web_url, name)} is not shown: the bot's Buildkite token "
            f"lacks the `{tail.missing_scope}` scope."
        )
        return ContextBlock(elements=[MarkdownTextObject(text=note)]).to_dict()
    header = f"Last lines of {link(tail.job.web_url, name)}:\n"
    body = clean_log(escape(tail.text), limit=SECTION_TEXT_LIMIT - len(header) - 10)
    return SectionBlock(text=MarkdownTextObject(text=f"{header}```{body}```")).to_dict()


def _section(text: str) -> Rendered:
    text = clip(text, SECTION_TEXT_LIMIT)
    plain = text  # Slack shows mrkdwn in notifications' fallback text too.
    return Rendered(text=plain, blocks=[SectionBlock(text=MarkdownTextObject(text=text)).to_dict()])


def notice(text: str) -> Rendered:
    """A short ephemeral answer to the person who typed or clicked."""
    return _section(text)


@dataclass(frozen=True)
class DeployPlan:
    """What a protected deploy will do, shown before it is confirmed or approved."""

    pipeline: str
    branch: str
    commit: str
    message: str
    env: dict[str, str]
    requester: str
    resolved_sha: str | None = None
    resolved_from: str | None = None
    diff_url: str | None = None
    approvers: tuple[str, ...] = ()
    expires_in: int | None = None
    #: The number of the build this re-runs, when it is a /rebuild of a protected pipeline.
    rebuild_of: int | None = None


#: Keep a confirmation's or an approval's blocks well under the ~13k Slack accepts in one message.
PLAN_BLOCKS_BUDGET = 12000
MAX_BLOCKS = 50


def _plan_lines(plan: DeployPlan) -> list[str]:
    commit = code(plan.commit)
    if plan.commit == "HEAD" and plan.resolved_sha:
        commit += (
            f" (last built as {code(plan.resolved_sha[:12])} in {escape(plan.resolved_from or '')})"
        )
    lines = [
        f"*Pipeline:* {code(plan.pipeline)}",
        f"*Branch:* {code(plan.branch)}",  # at most 255 characters, shown in full
        f"*Commit:* {commit}",
        f"*Message:* {clip(plain(plan.message), 500)}",
    ]
    if plan.rebuild_of is not None:
        lines.insert(1, f"*Rebuild of:* #{plan.rebuild_of} (as a new build)")
    if plan.env:
        lines.append(f"*Environment:* {len(plan.env)} variables, in full below")
    if plan.diff_url:
        label = "compare with the last passed build"
        lines.append(f"*Changes:* {link(plan.diff_url, label, hosts=('github.com',))}")
    return lines


def _env_line(name: str, value: str) -> str:
    return preformatted(f"{name}={value}")


def _env_blocks(plan: DeployPlan) -> list[dict[str, Any]]:
    """Every variable in full, as preformatted sections packed up to Block Kit's section limit."""
    blocks: list[dict[str, Any]] = []
    chunk: list[str] = []
    room = SECTION_TEXT_LIMIT - len("```\n\n```")
    for line in (_env_line(k, v) for k, v in plan.env.items()):
        if chunk and len("\n".join([*chunk, line])) > room:
            blocks.append(_preformatted(chunk))
            chunk = []
        chunk.append(line)
    if chunk:
        blocks.append(_preformatted(chunk))
    return blocks


def _preformatted(lines: list[str]) -> dict[str, Any]:
    text = "```\n" + "\n".join(lines) + "\n```"
    return SectionBlock(text=MarkdownTextObject(text=text)).to_dict()


def plan_refusal(plan: DeployPlan) -> str | None:
    """Why this plan cannot be shown in full to whoever confirms or approves it, or None."""
    for rendered in (confirm_deploy(plan, "0" * 16), approval_request(plan, "0" * 16)):
        blocks = rendered.blocks
        texts = [str((b.get("text") or {}).get("text", "")) for b in blocks]
        if (
            len(blocks) > MAX_BLOCKS
            or any(len(t) > SECTION_TEXT_LIMIT for t in texts)
            or len(json.dumps(blocks, ensure_ascii=False)) > PLAN_BLOCKS_BUDGET
        ):
            return (
                "This deploy's environment is too large to show in full to whoever confirms or "
                "approves it (Slack's message limits), so nothing was started. Send fewer or "
                "shorter variables."
            )
    return None


def confirm_deploy(plan: DeployPlan, request_id: str) -> Rendered:
    """The ephemeral 'are you sure?' for a protected pipeline."""
    value = RequestButtonValue(id=request_id).model_dump_json()
    needs = (
        "\nIt then needs approval by " + ", ".join(plan.approvers) + "." if plan.approvers else ""
    )
    what = "Rebuild" if plan.rebuild_of is not None else "Deploy"
    text = f":shield: `{plan.pipeline}` is protected. {what} this?{needs}\n" + "\n".join(
        _plan_lines(plan)
    )
    blocks = [
        SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict(),
        *_env_blocks(plan),
        ActionsBlock(
            block_id="deploy_confirmation",
            elements=[
                ButtonElement(
                    text=what, action_id=ActionId.CONFIRM_DEPLOY, value=value, style="primary"
                ),
                ButtonElement(text="Cancel", action_id=ActionId.ABORT_DEPLOY, value=value),
            ],
        ).to_dict(),
    ]
    return Rendered(text=f"{what} {plan.pipeline}? It is protected.", blocks=blocks)


def approval_request(
    plan: DeployPlan,
    approval_id: str,
    *,
    status: str = "pending",
    decided_by: str | None = None,
    build: Build | None = None,
    reason: str | None = None,
) -> Rendered:
    """The in-channel request for a second person's approval, and its outcome."""
    value = RequestButtonValue(id=approval_id).model_dump_json()
    rebuild = plan.rebuild_of is not None
    what = f"rebuild of #{plan.rebuild_of}" if rebuild else "deploy"
    asks = f"rebuild `{plan.pipeline}` #{plan.rebuild_of}" if rebuild else "deploy"
    asks += "" if rebuild else f" `{plan.pipeline}`"
    header = {
        "pending": f":raised_hand: <@{plan.requester}> asks to {asks}. "
        f"Approval needed from {', '.join(plan.approvers)} (not the requester)"
        + (f"; expires in {plan.expires_in // 60} min." if plan.expires_in else "."),
        "approved": f":white_check_mark: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"<@{plan.requester}> was approved by <@{decided_by}>.",
        "rejected": f":no_entry: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"<@{plan.requester}> was rejected by <@{decided_by}>.",
        "refused": f":no_entry: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"<@{plan.requester}> was approved by <@{decided_by}> but not started: "
        f"{reason or 'it is no longer allowed'}",
        "expired": f":hourglass: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"<@{plan.requester}> expired before anyone approved it. Nothing was started.",
    }[status]
    if build is not None:
        header += f" Started {link(build.web_url, f'{plan.pipeline} #{build.number}')}."
    text = header + "\n" + "\n".join(_plan_lines(plan))
    blocks: list[dict[str, Any]] = [
        SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict(),
        *_env_blocks(plan),
    ]
    if status == "pending":
        blocks.append(
            ActionsBlock(
                block_id="approval",
                elements=[
                    ButtonElement(
                        text="Approve", action_id=ActionId.APPROVE, value=value, style="primary"
                    ),
                    ButtonElement(
                        text="Reject", action_id=ActionId.REJECT, value=value, style="danger"
                    ),
                ],
            ).to_dict()
        )
    return Rendered(text=clip(header, 300), blocks=blocks)


def lock_reason(reason: object) -> str:
    """A lock's reason, as typed, for after a lock's holder: ` (reason)`, or nothing."""
    return f" ({clip(plain(str(reason)), 300)})" if reason else ""


def locked_text(pipeline: str, holder: str, reason: object) -> str:
    """Why a deploy cannot go ahead: someone else holds the pipeline's lock."""
    return f":lock: {code(pipeline)} is locked by <@{holder}>{lock_reason(reason)}."


def lock_announcement(user: str, pipeline: str, until: str, reason: str) -> str:
    """The in-channel note that someone locked a pipeline, with their reason shown as text."""
    said = f": {clip(plain(reason), 300)}" if reason else "."
    return (
        f":lock: <@{user}> locked {code(pipeline)}{until}{said} "
        "Nobody else can deploy it meanwhile."
    )


def locks_list(locks: list[PipelineLock]) -> str:
    if not locks:
        return ":unlock: No pipeline is locked."
    lines = [":lock: *Locked pipelines:*"]
    for lock in locks:
        until = ""
        if lock.expires_at:
            until = f", until <!date^{int(lock.expires_at)}^{{date_short_pretty}} {{time}}|later>"
        reason = f": {clip(plain(lock.reason), 300)}" if lock.reason else ""
        lines.append(f"• `{lock.pipeline}` by <@{lock.user}>{until}{reason}")
    return clip("\n".join(lines), SECTION_TEXT_LIMIT)


def audit_list(entries: list[AuditEntry], pipeline: str | None) -> str:
    scope = f" for `{pipeline}`" if pipeline else ""
    if not entries:
        return f"No audit entries{scope} yet."
    lines = [f":scroll: *Last {len(entries)} audited actions{scope}* (newest first):"]
    for entry in entries:
        target = entry.pipeline
        if entry.build:
            target += f" #{entry.build}"
        where = f" in <#{entry.channel}>" if entry.channel else ""
        url = f" {link(entry.url, 'build')}" if entry.url else ""
        detail = f" ({clip(plain(entry.detail), 200)})" if entry.detail else ""
        lines.append(
            f"• <!date^{int(float(entry.time))}^{{date_short}} {{time}}|?> "
            f"<@{entry.user}> {entry.action} `{target}`{where}: "
            f"*{entry.outcome}*{detail}{url}"
        )
    return clip("\n".join(lines), SECTION_TEXT_LIMIT)


class UnblockMetadata(BaseModel):
    """What the unblock modal carries in its private_metadata: validated again on submit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pipeline: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,99}$")
    number: int = Field(gt=0, lt=10**9)
    job: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    channel: str = Field(pattern=r"^[A-Z0-9]{2,20}$")
    thread_ts: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    label: str = Field(default="the block step", max_length=200)


UNBLOCK_CALLBACK = "unblock_submit"


def field_block_id(key: str) -> str:
    return f"field:{key}"[:255]


#: The block_id of the free-form `key=value` input (a step whose fields the bot does not know).
FREEFORM_BLOCK = "unblock_freeform"


def _option(option: Option) -> dict[str, Any]:
    return {"text": {"type": "plain_text", "text": clip(option.label, 75)}, "value": option.value}


def _field_input(spec: FormField) -> dict[str, Any]:
    element: dict[str, Any]
    if spec.kind == "select":
        options = [_option(o) for o in spec.options]
        initial = [_option(o) for o in spec.initial_options]
        if spec.multiple:
            element = {"type": "multi_static_select", "action_id": "value", "options": options}
            if initial:
                element["initial_options"] = initial
        else:
            element = {"type": "static_select", "action_id": "value", "options": options}
            if initial:
                element["initial_option"] = initial[0]
    else:
        element = {"type": "plain_text_input", "action_id": "value"}
        if spec.default:
            element["initial_value"] = clip(spec.default[0], 3000)
            element["multiline"] = "\n" in spec.default[0]
    block: dict[str, Any] = {
        "type": "input",
        "block_id": field_block_id(spec.key),
        "label": {"type": "plain_text", "text": clip(spec.label, 2000)},
        "element": element,
        "optional": not spec.required,
    }
    if spec.hint:
        block["hint"] = {"type": "plain_text", "text": clip(spec.hint, 2000)}
    return block


def _modal(metadata: UnblockMetadata, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "modal",
        "callback_id": UNBLOCK_CALLBACK,
        "title": {"type": "plain_text", "text": "Unblock"},
        "submit": {"type": "plain_text", "text": "Unblock"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": metadata.model_dump_json(exclude_none=True),
        "blocks": blocks,
    }


def unblock_modal(label: str, form: BlockForm, metadata: UnblockMetadata) -> dict[str, Any]:
    """A modal built from a block step's fields (text and select, as in Buildkite's YAML)."""
    title = f"*{clip(escape(label), 300)}*"
    if form.prompt:
        title += "\n" + clip(escape(form.prompt), 2500)
    blocks: list[dict[str, Any]] = [
        SectionBlock(text=MarkdownTextObject(text=title)).to_dict(),
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"Fields from {form.source}."}],
        },
    ]
    blocks += [_field_input(spec) for spec in form.fields]
    return _modal(metadata, blocks)


def unblock_freeform_modal(
    label: str, build_url: str | None, problem: str | None, metadata: UnblockMetadata
) -> dict[str, Any]:
    """The modal for a block step whose fields the bot does not know: `key=value` lines."""
    where = (
        link(build_url, f"{metadata.pipeline} #{metadata.number}")
        if build_url
        else f"`{metadata.pipeline}` #{metadata.number}"
    )
    why = (
        f"The bot does not know this step's fields: {escape(problem)}."
        if problem
        else "The bot does not know this step's fields: Buildkite's API does not return them, "
        "and neither the pipeline's steps nor the policy's `unblock_forms` describe this step "
        "(steps uploaded by an agent live only in the build)."
    )
    text = (
        f"*{clip(escape(label), 300)}*\n{why}\nSee them on {where}, and type them below, "
        "one `key=value` a line, or leave it empty if the step has none."
    )
    blocks = [
        SectionBlock(text=MarkdownTextObject(text=clip(text, 3000))).to_dict(),
        {
            "type": "input",
            "block_id": FREEFORM_BLOCK,
            "label": {"type": "plain_text", "text": "Fields (key=value, one a line)"},
            "element": {
                "type": "plain_text_input",
                "action_id": "value",
                "multiline": True,
                "placeholder": {"type": "plain_text", "text": "release-name=Flying Dolphin"},
            },
            "optional": True,
            "hint": {
                "type": "plain_text",
                "text": "Keys are letters, digits, /, - and _. Give a key twice for several "
                "choices of one select.",
            },
        },
    ]
    return _modal(metadata, blocks)


def unblocked_reply(user: str, label: str, fields: dict[str, str]) -> Rendered:
    text = f":unlock: <@{user}> unblocked *{clip(plain(label), 200)}*."
    if fields:
        # A select's several choices come as lines; inline code cannot hold a line break.
        pairs = "\n".join(
            f"• {escape(k)}: {code(clip(v.replace(chr(10), ', '), 200))}" for k, v in fields.items()
        )
        text += "\n" + clip(pairs, 2000)
    return _section(text)


def retried_reply(
    user: str | None, jobs: list[Job], *, attempt: tuple[int, int] | None = None
) -> Rendered:
    names = ", ".join(link(j.web_url, clip(j.display_name, 100)) for j in jobs[:10]) or "none"
    if attempt is not None:
        text = f":repeat: Auto-retried failed jobs (attempt {attempt[0]} of {attempt[1]}): {names}."
    else:
        text = f":repeat: <@{user}> retried the failed jobs: {names}."
    return _section(text)


# -- The /buildkite operator surface: pipelines, builds, agents, whoami, health ---------------

_SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{0,99}$"
PIPELINE_CREATE_CALLBACK = "pipeline_create"
PIPELINE_UPDATE_CALLBACK = "pipeline_update"
MAX_JOBS_LISTED = 30


class _ButtonValue(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelinesPageValue(_ButtonValue):
    """The "More" button under a list of pipelines: which page, with which filter."""

    page: int = Field(ge=1, le=1000)
    filter: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,50}$")


class BuildsPageValue(_ButtonValue):
    """The "More" button under a list of builds (the branch is checked again when clicked)."""

    page: int = Field(ge=1, le=1000)
    pipeline: str | None = Field(default=None, pattern=_SLUG_PATTERN)
    state: str | None = Field(default=None, pattern=r"^[a-z_]{1,20}$")
    branch: str | None = Field(default=None, min_length=1, max_length=255)


class AgentsPageValue(_ButtonValue):
    """The "More" button under a list of agents."""

    page: int = Field(ge=1, le=1000)
    queue: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")


class AgentButtonValue(_ButtonValue):
    """An agent's Stop and Force stop buttons."""

    id: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    name: str = Field(min_length=1, max_length=100)


class PipelineButtonValue(_ButtonValue):
    """The confirmation button of a pipeline deletion."""

    pipeline: str = Field(pattern=_SLUG_PATTERN)


class PipelineModalMetadata(_ButtonValue):
    """What the pipeline create/update modal carries in its private_metadata."""

    channel: str = Field(pattern=r"^[A-Z0-9]{2,20}$")
    pipeline: str | None = Field(default=None, pattern=_SLUG_PATTERN)


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


@dataclass(frozen=True)
class PipelineHealth:
    """One pipeline's figures over a digest's window (see app.core.digest for the definitions)."""

    slug: str
    builds: int
    passed: int
    failed: int
    #: passed / (passed + failed); None when none of its builds passed or failed.
    pass_rate: float | None
    #: Nearest-rank median and 95th percentile of passed and failed builds' durations (s).
    median: int | None
    p95: int | None
    #: Passed builds in which some job had been retried, and their URLs.
    flaky: int = 0
    flaky_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Digest:
    scope: str
    window: str
    since: datetime
    until: datetime
    pipelines: tuple[PipelineHealth, ...]
    top_failing: tuple[PipelineHealth, ...]
    flaky: tuple[PipelineHealth, ...]
    builds_read: int
    requests: int
    #: Passed builds re-read with their jobs to spot retried jobs (None: not looked at).
    jobs_read: int | None
    capped: bool = False
    #: Set when a scheduled digest is posted after its time (the bot was down).
    late_for: datetime | None = None


def seconds_text(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _cost(requests: int) -> str:
    return f"{requests} Buildkite API request{'s' if requests != 1 else ''}"


def _more_button(action_id: ActionId, value: BaseModel, block_id: str) -> dict[str, Any]:
    return ActionsBlock(
        block_id=block_id,
        elements=[ButtonElement(text="More", action_id=action_id, value=value.model_dump_json())],
    ).to_dict()


def _context(text: str) -> dict[str, Any]:
    return ContextBlock(
        elements=[MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))]
    ).to_dict()


def _text_section(text: str) -> dict[str, Any]:
    return SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict()


def _build_line(build: Build, pipeline: str | None = None) -> str:
    slug = pipeline or build.pipeline_slug or "build"
    took = duration(build)
    if took is None and build.started_at is not None and not build.is_final:
        took = "running"
    key = state_key(build)
    unknown = "" if key in STATE_LABEL else f" {code(key)}"
    parts = [
        f"{state_emoji(key)}{unknown} {_title(slug, build)}",
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
        return _section(f"No pipelines{where}" + (" on this page." if page.page > 1 else "."))
    blocks = [_text_section(f":building_construction: *Pipelines{where}* (page {page.page})")]
    for row in page.rows:
        last = row.last_build
        state = (
            f"last build {state_emoji(state_key(last))} {_title(row.slug, last)}"
            if last is not None
            else "no builds yet"
        )
        branch = code(clip(row.default_branch or "?", 100))
        blocks.append(_text_section(f"*{link(row.web_url, row.slug)}* · {branch} · {state}"))
    blocks.append(_context(f"This page cost {_cost(page.requests)}."))
    if page.has_more:
        value = PipelinesPageValue(page=page.page + 1, filter=page.filter)
        blocks.append(_more_button(ActionId.PIPELINES_MORE, value, "pipelines_more"))
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
        return _section(
            f"No builds of {scope}{filters}" + (" on this page." if page.page > 1 else ".")
        )
    lines = [_build_line(build, page.pipeline) for build in page.builds]
    blocks = [
        _text_section(f":scroll: *{title}* (page {page.page})\n" + "\n".join(lines)),
        _context(f"This page cost {_cost(page.requests)}."),
    ]
    if page.has_more:
        value = BuildsPageValue(
            page=page.page + 1, pipeline=page.pipeline, state=page.state, branch=page.branch
        )
        blocks.append(_more_button(ActionId.BUILDS_MORE, value, "builds_more"))
    return Rendered(text=f"{title}, page {page.page}", blocks=blocks)


JOB_EMOJI: dict[str, str] = {
    "passed": ":white_check_mark:",
    "failed": ":x:",
    "timed_out": ":x:",
    "broken": ":heavy_minus_sign:",
    "running": ":arrow_forward:",
    "canceled": ":no_entry_sign:",
    "canceling": ":no_entry_sign:",
    "skipped": ":fast_forward:",
    "blocked": ":double_vertical_bar:",
    "unblocked": ":unlock:",
}


def _job_line(job: Job) -> str:
    state = job.state or "pending"
    emoji = JOB_EMOJI.get(state, ":hourglass_flowing_sand:")
    shown = escape(state.replace("_", " "))
    line = f"{emoji} {link(job.web_url, clip(job.display_name, 100))} {shown}"
    if job.soft_failed:
        line += " (soft fail)"
    if job.started_at is not None and job.finished_at is not None:
        line += f" · {seconds_text(int((job.finished_at - job.started_at).total_seconds()))}"
    return line


def build_details(pipeline: str, build: Build) -> Rendered:
    """One build with its jobs, and the same buttons as its tracked message."""
    message = build_message(pipeline, build, None)
    *head, actions = message.blocks
    jobs = [job for job in build.jobs if job.type in {"script", "manual", "trigger"}]
    if jobs:
        lines = [_job_line(job) for job in jobs[:MAX_JOBS_LISTED]]
        if len(jobs) > MAX_JOBS_LISTED:
            lines.append(f"…and {len(jobs) - MAX_JOBS_LISTED} more jobs")
        head.append(_text_section("*Jobs*\n" + "\n".join(lines)))
    return Rendered(text=message.text, blocks=[*head, actions])


def agents_list(page: AgentsPage) -> Rendered:
    """A page of connected agents, each with Stop (graceful) and Force stop (confirmed)."""
    where = f" in queue {code(page.queue)}" if page.queue else ""
    if not page.rows:
        return _section(
            f"No connected agents{where}" + (" on this page." if page.page > 1 else ".")
        )
    blocks = [_text_section(f":robot_face: *Connected agents{where}* (page {page.page})")]
    for row in page.rows:
        if row.busy:
            job = link(row.job_url, clip(row.job_name or "a job", 100))
            status = f":large_green_circle: busy on {job}"
        else:
            status = ":white_circle: idle"
        version = f"v{escape(row.version)}" if row.version else "version ?"
        blocks.append(
            _text_section(
                f"*{link(row.web_url, row.name)}* · queue {code(row.queue)} · {version} · {status}"
            )
        )
        value = AgentButtonValue(id=row.id, name=clip(row.name, 100)).model_dump_json()
        blocks.append(
            ActionsBlock(
                block_id=f"agent:{row.id}"[:255],
                elements=[
                    ButtonElement(text="Stop", action_id=ActionId.AGENT_STOP, value=value),
                    ButtonElement(
                        text="Force stop",
                        action_id=ActionId.AGENT_FORCE_STOP,
                        value=value,
                        style="danger",
                        confirm=ConfirmObject(
                            title="Force-stop this agent?",
                            text=clip(
                                f"Stop {escape(row.name)} now? Its current job is canceled.", 300
                            ),
                            confirm="Force stop",
                            deny="Keep it",
                        ),
                    ),
                ],
            ).to_dict()
        )
    blocks.append(
        _context(
            f"This page cost {_cost(page.requests)}. *Stop* lets the agent finish its job first."
        )
    )
    if page.has_more:
        more = AgentsPageValue(page=page.page + 1, queue=page.queue)
        blocks.append(_more_button(ActionId.AGENTS_MORE, more, "agents_more"))
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
    return _section("\n".join(lines))


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


def _utc(moment: datetime) -> str:
    return moment.strftime("%d %b %H:%M UTC")


def health_digest(digest: Digest) -> Rendered:
    """The build-health digest: a table per pipeline, the worst three, and the flaky ones."""
    scope = "all pipelines" if digest.scope == "all" else digest.scope
    title = f":bar_chart: *Build health of {escape(scope)}, last {digest.window}*"
    title += f" ({_utc(digest.since)} to {_utc(digest.until)})"
    if digest.late_for is not None:
        title += (
            f"\n:hourglass: Scheduled for {_utc(digest.late_for)}; posted late because the bot "
            "was not running then."
        )
    blocks = [_text_section(title)]
    rows = sorted(digest.pipelines, key=lambda p: (-p.builds, p.slug))
    if not rows:
        blocks.append(_text_section("No builds in this window."))
    else:
        shown = rows[:25]
        width = max(8, *(len(p.slug) for p in shown))
        header = f"{'pipeline':<{width}}  builds   pass   median      p95  failed"
        lines = [
            f"{preformatted(p.slug):<{width}}  {p.builds:>6}  {_percent(p.pass_rate):>5}  "
            f"{seconds_text(p.median):>7}  {seconds_text(p.p95):>7}  {p.failed:>6}"
            for p in shown
        ]
        more = f"\n…and {len(rows) - len(shown)} more pipelines" if len(rows) > len(shown) else ""
        blocks.append(_text_section("```" + "\n".join([header, *lines]) + "```" + more))
        if digest.top_failing:
            worst = [
                f"• {code(p.slug)}: {p.failed} failed of {p.builds} "
                f"(pass rate {_percent(p.pass_rate)})"
                for p in digest.top_failing
            ]
            blocks.append(_text_section("*Most failures*\n" + "\n".join(worst)))
        if digest.jobs_read is not None:
            if digest.flaky:
                flaky = [
                    f"• {code(p.slug)}: {p.flaky} passed build{'s' if p.flaky != 1 else ''} "
                    "after a "
                    "retried job ("
                    + ", ".join(link(url, f"#{url.rsplit('/', 1)[-1]}") for url in p.flaky_urls[:5])
                    + ")"
                    for p in digest.flaky
                ]
                blocks.append(
                    _text_section("*Flaky: failures that passed on a retry*\n" + "\n".join(flaky))
                )
            else:
                blocks.append(_text_section("*Flaky:* no passed build needed a retried job."))
    jobs = (
        f", of which {digest.jobs_read} passed builds re-read with their jobs to spot retries"
        if digest.jobs_read is not None
        else ""
    )
    capped = " Only the newest builds were read (cap reached)." if digest.capped else ""
    blocks.append(
        _context(
            f"Read {digest.builds_read} builds in {_cost(digest.requests)} (100 per page{jobs})."
            f"{capped} Pass rate = passed / (passed + failed); durations from start to finish of "
            "passed and failed builds; median and p95 by nearest rank."
        )
    )
    text = f"Build health of {escape(scope)}, last {digest.window}"
    return Rendered(text=text, blocks=blocks)


def confirm_pipeline_delete(slug: str, name: str, web_url: str | None) -> Rendered:
    """The ephemeral 'are you sure?' before a pipeline is deleted."""
    value = PipelineButtonValue(pipeline=slug).model_dump_json()
    text = (
        f":warning: Delete the pipeline {link(web_url, name)} ({code(slug)}) with all its builds? "
        "This cannot be undone."
    )
    blocks = [
        _text_section(text),
        ActionsBlock(
            block_id="pipeline_delete",
            elements=[
                ButtonElement(
                    text="Delete pipeline",
                    action_id=ActionId.PIPELINE_DELETE,
                    value=value,
                    style="danger",
                    confirm=ConfirmObject(
                        title="Delete this pipeline?",
                        text=clip(f"Delete {slug} and all its builds for good?", 300),
                        confirm="Delete",
                        deny="Keep it",
                    ),
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
    return _section(f":building_construction: <@{user}> {verb} the pipeline {target}{extra}.")


def _input(
    block_id: str,
    label: str,
    initial: str | None,
    *,
    multiline: bool = False,
    optional: bool = False,
    hint: str | None = None,
) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "plain_text_input", "action_id": "value"}
    if multiline:
        element["multiline"] = True
    if initial:
        element["initial_value"] = clip(initial, 3000)
    block: dict[str, Any] = {
        "type": "input",
        "block_id": block_id,
        "label": {"type": "plain_text", "text": label},
        "element": element,
        "optional": optional,
    }
    if hint:
        block["hint"] = {"type": "plain_text", "text": clip(hint, 2000)}
    return block


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
    blocks: list[dict[str, Any]] = []
    if error:
        blocks.append(_text_section(f":x: {clip(escape(error), 2900)}"))
    if updating:
        blocks.append(_text_section(f"Changing the settings of `{metadata.pipeline}`."))
    else:
        blocks.append(_input("name", "Name", name, hint="The slug is derived from it."))
    blocks += [
        _input("repository", "Repository URL", repository, hint="e.g. git@github.com:acme/web.git"),
        _input("default_branch", "Default branch", default_branch, optional=True),
        _input("description", "Description", description, optional=True),
    ]
    if not updating:
        blocks.append(
            _input(
                "steps",
                "Steps (YAML)",
                steps,
                multiline=True,
                hint="A top-level `steps:` list, as in pipeline.yml.",
            )
        )
    return {
        "type": "modal",
        "callback_id": PIPELINE_UPDATE_CALLBACK if updating else PIPELINE_CREATE_CALLBACK,
        "title": {"type": "plain_text", "text": "Update pipeline" if updating else "New pipeline"},
        "submit": {"type": "plain_text", "text": "Save" if updating else "Create"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": metadata.model_dump_json(exclude_none=True),
        "blocks": blocks,
    }


def modal_notice(title: str, text: str) -> dict[str, Any]:
    """A modal that only says something: progress, or the outcome of a submission."""
    return {
        "type": "modal",
        "title": {"type": "plain_text", "text": clip(title, 24)},
        "close": {"type": "plain_text", "text": "Close"},
        "blocks": [_text_section(text)],
    }
