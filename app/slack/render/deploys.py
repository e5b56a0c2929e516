"""A protected deploy's plan, its confirmation and approval messages, and the lock and audit
answers of /deploy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from slack_sdk.models.blocks import ActionsBlock, ButtonElement, MarkdownTextObject, SectionBlock

from app.slack.ids import ActionId, BlockId
from app.slack.mrkdwn import code, escape, link, person, plain, preformatted
from app.slack.payloads import RequestButtonValue
from app.slack.render.common import SECTION_TEXT_LIMIT, Rendered, clip
from app.storage.records import AuditEntry, PipelineLock
from buildkite.models import Build

#: Keep a confirmation's or an approval's blocks well under the ~13k Slack accepts in one message.
PLAN_BLOCKS_BUDGET = 12000
MAX_BLOCKS = 50


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
    #: A rollback: the live build it replaces, and that build's commit.
    rollback_of: int | None = None
    rollback_from: str | None = None
    #: A promotion: `pipeline#number` of the deployment whose commit it deploys.
    promoted_from: str | None = None
    #: A deploy through a freeze: the reason given with --break-glass, and the freeze's.
    break_glass: str | None = None
    freeze: str | None = None
    #: The freeze occurrences in force when it was asked (Occurrence.key), overlapping ones
    #: included: its approval goes through those only, never through another freeze (even one
    #: that started on top of them) or a later occurrence of the same one.
    freeze_keys: list[str] | None = None
    #: The person an agent requester works for (app.agents): named beside it, never approving.
    acts_for: str | None = None


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
    lines[1:1] = _release_lines(plan)
    if plan.break_glass is not None:
        during = f" (through the freeze {code(plan.freeze)})" if plan.freeze else ""
        lines.insert(0, f"*Break-glass:* {clip(plain(plan.break_glass), 300)}{during}")
    if plan.env:
        lines.append(f"*Environment:* {len(plan.env)} variables, in full below")
    if plan.diff_url:
        label = "compare with the last passed build"
        lines.append(f"*Changes:* {link(plan.diff_url, label, hosts=('github.com',))}")
    return lines


def _release_lines(plan: DeployPlan) -> list[str]:
    """What a rollback or a promotion adds to a plan: from which commit to which, or whence."""
    lines = []
    if plan.rollback_of is not None:
        before = code((plan.rollback_from or "?")[:12])
        lines.append(
            f"*Rollback of:* #{plan.rollback_of}, from {before} to {code(plan.commit[:12])}"
        )
    if plan.promoted_from:
        lines.append(f"*Promoted from:* {code(plan.promoted_from)}")
    return lines


def _env_blocks(plan: DeployPlan) -> list[dict[str, Any]]:
    """Every variable in full, as preformatted sections packed up to Block Kit's section limit."""
    blocks: list[dict[str, Any]] = []
    chunk: list[str] = []
    room = SECTION_TEXT_LIMIT - len("```\n\n```")
    for line in (preformatted(f"{k}={v}") for k, v in plan.env.items()):
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


def plan_refusal(plan: DeployPlan, request_id: str, approval_id: str) -> str | None:
    """Why this plan cannot be shown in full to whoever confirms or approves it, or None.

    The ids are those its confirmation and approval will carry, so the sizes are exact.
    """
    for rendered in (confirm_deploy(plan, request_id), approval_request(plan, approval_id)):
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
    noun, asks, what = plan_kind(plan)
    question = (
        f"{asks[0].upper()}{asks[1:]}?" if noun in ("rollback", "promotion") else f"{what} this?"
    )
    text = f":shield: `{plan.pipeline}` is protected. {question}{needs}\n"
    text += "\n".join(_plan_lines(plan))
    blocks = [
        SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict(),
        *_env_blocks(plan),
        ActionsBlock(
            block_id=BlockId.DEPLOY_CONFIRMATION,
            elements=[
                ButtonElement(
                    text=what, action_id=ActionId.CONFIRM_DEPLOY, value=value, style="primary"
                ),
                ButtonElement(text="Cancel", action_id=ActionId.ABORT_DEPLOY, value=value),
            ],
        ).to_dict(),
    ]
    return Rendered(text=f"{what} {plan.pipeline}? It is protected.", blocks=blocks)


def expiry_text(seconds: int) -> str:
    """How long an approval has left: "30 s" under a minute, else minutes ("2 min")."""
    return f"{seconds} s" if seconds < 60 else f"{round(seconds / 60)} min"


def plan_kind(plan: DeployPlan) -> tuple[str, str, str]:
    """What a plan is, truthfully: (its noun, its verb phrase for "asks to …", its button).

    A rollback and a promotion are deploys to the policy, but never shown as a plain deploy."""
    pipeline = code(plan.pipeline)
    if plan.rebuild_of is not None:
        return f"rebuild of #{plan.rebuild_of}", f"rebuild {pipeline} #{plan.rebuild_of}", "Rebuild"
    if plan.rollback_of is not None:
        before = code((plan.rollback_from or "?")[:12])
        return (
            "rollback",
            f"roll back {pipeline} from #{plan.rollback_of} ({before}) to {code(plan.commit[:12])}",
            "Roll back",
        )
    if plan.promoted_from:
        return (
            "promotion",
            f"promote {code(plan.commit[:12])} from {code(plan.promoted_from)} to {pipeline}",
            "Promote",
        )
    return "deploy", f"deploy {pipeline}", "Deploy"


def plan_summary(plan: DeployPlan) -> str:
    """A rollback's or a promotion's plan as plain text, for the audit ("" for a deploy)."""
    if plan.rollback_of is not None:
        before = (plan.rollback_from or "?")[:12]
        return f"rollback of #{plan.rollback_of} ({before}) to {plan.commit[:12]}"
    if plan.promoted_from:
        return f"promotion of {plan.commit[:12]} from {plan.promoted_from}"
    return ""


def _approval_header(
    plan: DeployPlan, status: str, decided_by: str | None, reason: str | None
) -> str:
    what, asks, _ = plan_kind(plan)
    requester = person(plan.requester)
    if plan.acts_for:
        requester += f" (acting for <@{plan.acts_for}>)"
    not_them = "not the requester" + (" nor the person it acts for" if plan.acts_for else "")
    return {
        "pending": f":raised_hand: {requester} asks to {asks}. "
        f"Approval needed from {', '.join(plan.approvers)} ({not_them})"
        + (f"; expires in {expiry_text(plan.expires_in)}." if plan.expires_in else "."),
        "approved": f":white_check_mark: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"{requester} was approved by <@{decided_by}>.",
        "rejected": f":no_entry: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"{requester} was rejected by <@{decided_by}>.",
        "refused": f":no_entry: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"{requester} was approved by <@{decided_by}> but not started: "
        f"{reason or 'it is no longer allowed'}",
        "expired": f":hourglass: {what.capitalize()} of `{plan.pipeline}` requested by "
        f"{requester} expired before anyone approved it. Nothing was started.",
    }[status]


def approval_request(
    plan: DeployPlan,
    approval_id: str | None,
    *,
    status: str = "pending",
    decided_by: str | None = None,
    build: Build | None = None,
    reason: str | None = None,
) -> Rendered:
    """The in-channel request for a second person's approval, and its outcome.

    Only a pending request has buttons, which carry `approval_id`; a decided one needs none.
    """
    header = _approval_header(plan, status, decided_by, reason)
    if build is not None:
        header += f" Started {link(build.web_url, f'{plan.pipeline} #{build.number}')}."
    text = header + "\n" + "\n".join(_plan_lines(plan))
    blocks: list[dict[str, Any]] = [
        SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict(),
        *_env_blocks(plan),
    ]
    if status == "pending" and approval_id is not None:
        value = RequestButtonValue(id=approval_id).model_dump_json()
        blocks.append(
            ActionsBlock(
                block_id=BlockId.APPROVAL,
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
    return f":lock: {code(pipeline)} is locked by {person(holder)}{lock_reason(reason)}."


def _sentence(text: str) -> str:
    """`text` ending as a sentence does, so that the next one does not run on from it."""
    return text if text.endswith((".", "!", "?", "…")) else f"{text}."


def lock_announcement(user: str, pipeline: str, until: str, reason: str) -> str:
    """The in-channel note that someone locked a pipeline, with their reason shown as text."""
    said = f": {_sentence(clip(plain(reason), 300))}" if reason else "."
    return (
        f":lock: {person(user)} locked {code(pipeline)}{until}{said} "
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
        lines.append(f"• `{lock.pipeline}` by {person(lock.user)}{until}{reason}")
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
            f"{person(entry.user)} {entry.action} `{target}`{where}: "
            f"*{entry.outcome}*{detail}{url}"
        )
    return clip("\n".join(lines), SECTION_TEXT_LIMIT)
