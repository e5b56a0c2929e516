"""A build's messages: the one root message per build and channel, its thread replies (running,
failing, final with the log tail, unblocked, retried), and the build with its jobs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ContextBlock,
    MarkdownTextObject,
    SectionBlock,
)

from app.slack.ids import ActionId, BlockId
from app.slack.mrkdwn import code, escape, link, person, plain
from app.slack.payloads import UnblockButtonValue
from app.slack.render.common import (
    FIELD_TEXT_LIMIT,
    SECTION_TEXT_LIMIT,
    Rendered,
    build_title,
    clip,
    duration,
    one_section,
    seconds_text,
    section,
    short_commit,
    state_emoji,
    state_key,
    state_label,
    state_text,
)
from app.slack.render.supersede import superseded_note, superseded_unblock
from app.slack.render.unfurl import CARD_ACTIONS, author, card_buttons
from app.storage.records import SupersededBy
from buildkite.models import Build, BuildState, Job

MAX_FAILED_JOBS_LISTED = 10
MAX_JOBS_LISTED = 30
LOG_TAIL_LINES = 25
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b_bk;[^\x07]*\x07|\r")


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


def _trigger(build: Build) -> str:
    who = author(build)
    source = {
        "webhook": "a push",
        "schedule": "a schedule",
        "ui": "the web UI",
        "api": "the API",
        "trigger_job": "a trigger step",
    }.get(build.source or "", build.source or "")
    return f"{who} (via {source})" if source else who


def _buttons(
    pipeline: str, build: Build, block: BlockStep | None, superseded: SupersededBy | None = None
) -> list[ButtonElement]:
    buttons: list[ButtonElement] = []
    if block is not None and not build.is_final and superseded is not None:
        buttons += superseded_unblock(pipeline, build.number, block.job_id, block.label, superseded)
    elif block is not None and not build.is_final:
        unblock = UnblockButtonValue(pipeline=pipeline, number=build.number, job=block.job_id)
        buttons.append(
            ButtonElement(
                text=clip(f"Unblock: {block.label}", 75),
                action_id=ActionId.UNBLOCK,
                value=unblock.model_dump_json(),
                style="primary",
            )
        )
    return buttons + card_buttons(pipeline, build, CARD_ACTIONS)


def build_message(
    pipeline: str,
    build: Build,
    requester: str | None,
    *,
    block: BlockStep | None = None,
    superseded: SupersededBy | None = None,
) -> Rendered:
    """The one message per build and channel, updated in place on every state change.

    `requester` is who asked from Slack; a build announced by routing shows who triggered it.
    """
    title = build_title(pipeline, build)
    fields = [
        f"*State*\n{state_text(build)}",
        f"*Branch*\n{code(clip(build.branch or '?', 200))}",
        f"*Commit*\n{code(short_commit(build.commit))}",
        f"*Requested by*\n{person(requester)}"
        if requester
        else f"*Triggered by*\n{_trigger(build)}",
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
    if superseded is not None and not build.is_final:
        blocks.append(superseded_note(superseded))
    buttons = _buttons(pipeline, build, block, superseded)
    blocks.append(ActionsBlock(block_id=BlockId.BUILD_ACTIONS, elements=buttons).to_dict())
    text = f"{escape(pipeline)} #{build.number}: {state_label(state_key(build))}"
    return Rendered(text=text, blocks=blocks)


def running_reply(pipeline: str, build: Build) -> Rendered:
    text = f":arrow_forward: {build_title(pipeline, build)} started running."
    return one_section(text)


def failing_reply(pipeline: str, build: Build) -> Rendered:
    text = (
        f":warning: {build_title(pipeline, build)} is failing: a job has failed, others still run."
    )
    return one_section(text)


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
    who = f"{person(mention)} " if mention else ""
    text = f"{who}{state_emoji(build.state.value)} {build_title(pipeline, build)} {label}{when}."
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


def unblocked_reply(user: str, label: str, fields: dict[str, str]) -> Rendered:
    text = f":unlock: {person(user)} unblocked *{clip(plain(label), 200)}*."
    if fields:
        # A select's several choices come as lines; inline code cannot hold a line break.
        pairs = "\n".join(
            f"• {escape(k)}: {code(clip(v.replace(chr(10), ', '), 200))}" for k, v in fields.items()
        )
        text += "\n" + clip(pairs, 2000)
    return one_section(text)


def retried_reply(
    user: str | None, jobs: list[Job], *, attempt: tuple[int, int] | None = None
) -> Rendered:
    names = ", ".join(link(j.web_url, clip(j.display_name, 100)) for j in jobs[:10]) or "none"
    if attempt is not None:
        text = f":repeat: Auto-retried failed jobs (attempt {attempt[0]} of {attempt[1]}): {names}."
    else:
        text = f":repeat: {person(user or '?')} retried the failed jobs: {names}."
    return one_section(text)


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
        head.append(section("*Jobs*\n" + "\n".join(lines)))
    return Rendered(text=message.text, blocks=[*head, actions])
