"""What the release ledger shows people: `/deploy status`, `/deploy history`, and the answers and
refusals of rollback and promotion. Pure functions from the ledger's records to mrkdwn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from slack_sdk.models.blocks import MarkdownTextObject, SectionBlock

from app.slack.mrkdwn import code, link, person, plain
from app.slack.render.common import SECTION_TEXT_LIMIT, STATE_EMOJI, Rendered, clip
from app.slack.render.freezes import FreezeView, reason_text
from app.slack.render.freezes import when as date_token
from app.storage.ledger import Deployment, Outcome, Source
from app.storage.records import PipelineLock

#: A Block Kit message holds at most 50 blocks, and Slack refuses one much over 13k characters.
_MAX_SECTIONS = 48
_MESSAGE_BUDGET = 11_500
_GITHUB = ("github.com",)

#: status and history, when Redis (where the ledger is) cannot be reached: a read, not a deploy.
LEDGER_DOWN = (
    ":warning: The ledger of deployments is unavailable right now (the bot cannot reach its "
    "Redis). Please try again in a minute; Buildkite's builds list what ran meanwhile."
)


@dataclass(frozen=True)
class PipelineStatus:
    """What is live on one pipeline, and what is going on there now."""

    pipeline: str
    live: Deployment | None
    #: How far the default branch is past the live commit, on GitHub (None: not on GitHub).
    compare_url: str | None = None
    default_branch: str | None = None
    running: Sequence[Deployment] = field(default_factory=tuple)
    lock: PipelineLock | None = None
    #: The freeze in force on the pipeline, if any.
    freeze: FreezeView | None = None


def ago(seconds: float) -> str:
    """`5 min ago`, `3 h ago`, `2 d ago`."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def duration(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _who(entry: Deployment) -> str:
    if entry.requested_by and entry.requester_unverified:
        # Any of the build's jobs can write its meta_data: its word, not the bot's record.
        return f"{person(entry.requested_by)} (per build meta_data)"
    if entry.requested_by:
        return person(entry.requested_by)
    return "announced" if entry.source is Source.ROUTE else "someone outside Slack"


def _build(entry: Deployment) -> str:
    return link(entry.web_url, f"#{entry.number}")


def _when(entry: Deployment, now: float) -> str:
    moment = entry.finished_at or entry.started_at
    if moment is None:
        return "at an unknown time"
    return (
        f"<!date^{moment}^{{date_short_pretty}} {{time}}|{ago(now - moment)}> ({ago(now - moment)})"
    )


def _status_lines(status: PipelineStatus, now: float) -> list[str]:
    lines = [f"*{code(status.pipeline)}*"]
    live = status.live
    if live is None:
        lines.append("• nothing live: no passed deployment in the ledger")
    else:
        marks = ""
        if live.rollback_of is not None:
            marks += f", a rollback of #{live.rollback_of}"
        if live.promoted_from:
            marks += f", promoted from {code(live.promoted_from)}"
        lines.append(
            f"• live: {code(live.commit[:12])} ({code(live.branch)}) in {_build(live)} "
            f"by {_who(live)}, {_when(live, now)}{marks}"
        )
        if status.compare_url and status.default_branch:
            label = f"commits on {status.default_branch} since"
            lines.append(f"• {link(status.compare_url, label, hosts=_GITHUB)} (GitHub)")
    for entry in status.running:
        lines.append(
            f"• deploying now: {code(entry.commit[:12])} in {_build(entry)} by {_who(entry)}"
        )
    if status.lock is not None:
        lines.append(f"• :lock: locked by {person(status.lock.user)}")
    if (freeze := status.freeze) is not None:
        lines.append(
            f"• :snowflake: frozen: {reason_text(freeze.reason)} ({plain(freeze.window)}), "
            f"until {date_token(freeze.end, freeze.end_text)}: deploys, rebuilds, rollbacks and "
            "promotions are refused"
        )
    return lines


def _status_line(status: PipelineStatus, now: float) -> str:
    """One pipeline in one line, for `/deploy status all`."""
    live = status.live
    line = f"• *{code(status.pipeline)}* "
    if live is None:
        line += "nothing live"
    else:
        moment = live.finished_at or live.started_at
        when = f", {ago(now - moment)}" if moment is not None else ""
        line += f"{code(live.commit[:12])} {_build(live)} by {_who(live)}{when}"
        if status.compare_url:
            line += f" · {link(status.compare_url, 'since', hosts=_GITHUB)}"
    if status.running:
        line += " · :arrow_forward: " + " ".join(_build(entry) for entry in status.running)
    if status.lock is not None:
        line += f" · :lock: {person(status.lock.user)}"
    if (freeze := status.freeze) is not None:
        line += (
            f" · :snowflake: {reason_text(freeze.reason, 100)} until "
            f"{date_token(freeze.end, freeze.end_text)}"
        )
    return line


def status_message(statuses: Sequence[PipelineStatus], *, now: float) -> Rendered:
    """`/deploy status`: a paragraph for one pipeline, a line each for several."""
    if not statuses:
        text = (
            "No deployment is in the ledger yet. Deploys from Slack, and builds announced by a "
            "`deploy: true` notification route, are recorded as they happen."
        )
        return Rendered(text=text, blocks=[_section(text)])
    header = ":rocket: *What is live*" + (
        f" on {len(statuses)} pipelines" if len(statuses) > 1 else ""
    )
    if len(statuses) == 1:
        paragraphs = ["\n".join(_status_lines(statuses[0], now))]
    else:
        header += " (`since`: the default branch's commits since the live one, on GitHub)"
        paragraphs = [_status_line(status, now) for status in statuses]
    return _packed(header, paragraphs, fallback=header.replace("*", ""))


def _approver(entry: Deployment) -> str:
    assert entry.approved_by is not None
    if entry.approver_unverified:
        return f"{person(entry.approved_by)} (per build meta_data)"
    return person(entry.approved_by)


def history_message(pipeline: str, entries: Sequence[Deployment], *, now: float) -> Rendered:
    """`/deploy history`: the last deployments, newest first."""
    if not entries:
        text = f"No deployment of {code(pipeline)} is in the ledger."
        return Rendered(text=text, blocks=[_section(text)])
    header = f":scroll: *Last {len(entries)} deployments of {code(pipeline)}* (newest first)"
    lines = []
    for entry in entries:
        emoji = STATE_EMOJI.get(entry.outcome.value, ":grey_question:")
        approved = f", approved by {_approver(entry)}" if entry.approved_by else ""
        marks = ""
        if entry.rollback_of is not None:
            marks += f", rollback of #{entry.rollback_of}"
        if entry.promoted_from:
            marks += f", promoted from {code(entry.promoted_from)}"
        took = (
            "running"
            if entry.outcome is Outcome.RUNNING
            else f"{entry.outcome.value.replace('_', ' ')} in {duration(entry.duration)}"
        )
        lines.append(
            f"{emoji} {_build(entry)} {code(entry.commit[:12])} ({code(entry.branch)}) "
            f"by {_who(entry)}{approved}: {took}, {_when(entry, now)}{marks}"
        )
    return _packed(header, lines, fallback=f"Last {len(entries)} deployments of {pipeline}")


def _section(text: str) -> dict[str, object]:
    return SectionBlock(text=MarkdownTextObject(text=clip(text, SECTION_TEXT_LIMIT))).to_dict()


def _packed(header: str, paragraphs: Sequence[str], *, fallback: str) -> Rendered:
    """Paragraphs in as few sections as Block Kit's limits allow; what does not fit is counted."""
    sections: list[str] = [header]
    used = len(header)
    for index, paragraph in enumerate(paragraphs):
        paragraph = clip(paragraph, SECTION_TEXT_LIMIT - 100)
        if used + len(paragraph) > _MESSAGE_BUDGET or (
            len(sections) == _MAX_SECTIONS
            and len(sections[-1]) + 1 + len(paragraph) > SECTION_TEXT_LIMIT - 100
        ):
            sections[-1] += f"\n…and {len(paragraphs) - index} more not shown."
            break
        used += len(paragraph) + 1
        if len(sections[-1]) + 1 + len(paragraph) <= SECTION_TEXT_LIMIT - 100:
            sections[-1] += "\n" + paragraph
        else:
            sections.append(paragraph)
    return Rendered(text=clip(fallback, 300), blocks=[_section(s) for s in sections])


# -- rollback and promotion ----------------------------------------------------------------


def compare(url: str | None, label: str = "compare") -> str:
    return f" ({link(url, label, hosts=_GITHUB)})" if url else ""


def looking_up(pipeline: str, position: int = 0) -> str:
    """The ack of a rollback or a promotion, before the ledger and the policy are read: its
    place in /deploy's queue of deploys (0 when it goes ahead at once)."""
    if position == 0:
        return f":hourglass_flowing_sand: Looking up what was deployed on {code(pipeline)}…"
    return (
        f":hourglass_flowing_sand: {code(pipeline)} is number {position} in line behind other "
        "deploys; it will be looked up when its turn comes…"
    )


def rollback_started(
    web_url: str, pipeline: str, number: int, live: Deployment, target: Deployment, diff: str | None
) -> str:
    return (
        f":rewind: Rolling back {code(pipeline)} from {code(live.commit[:12])} (#{live.number}) "
        f"to {code(target.commit[:12])} (#{target.number}){compare(diff)}: "
        f"started {link(web_url, f'{pipeline} #{number}')}."
    )


def rollback_asked(pipeline: str, live: Deployment, target: Deployment, diff: str | None) -> str:
    return (
        f":rewind: Rollback of {code(pipeline)} from {code(live.commit[:12])} (#{live.number}) "
        f"to {code(target.commit[:12])} (#{target.number}){compare(diff)}: see above."
    )


def promote_started(web_url: str, pipeline: str, number: int, source: Deployment) -> str:
    return (
        f":arrow_double_up: Promoting {code(source.commit[:12])} from {code(source.pipeline)} "
        f"#{source.number} to {code(pipeline)}: started {link(web_url, f'{pipeline} #{number}')}."
    )


def no_rollback(reason: str) -> str:
    return f":no_entry: {reason} Nothing was started."


def no_promotion(reason: str) -> str:
    return f":no_entry: {reason} It cannot be promoted. Nothing was started."


def no_promote_rule(pipeline: str, rule: str) -> str:
    return (
        f":no_entry: {code(pipeline)} has no `promote_from` in its policy rule {code(rule)}, "
        "so there is no pipeline to promote from. Nothing was started."
    )


def nothing_live_on(source: str, pipeline: str) -> str:
    return (
        f":no_entry: Nothing is live on {code(source)} (no passed deployment in the ledger), so "
        f"there is nothing to promote to {code(pipeline)}. Nothing was started."
    )


def not_promoted(
    pipeline: str, source: str, rule: str, typed: str, sha: str | None, history_url: str
) -> str:
    """A deploy refused by `promote_from`: which commit, and where the source's history is."""
    history = f"See `/deploy history {source}` or {link(history_url, f'the builds of {source}')}."
    if sha is None:
        what = code(typed[:40])
        return (
            f":no_entry: {code(pipeline)} takes only commits that passed a deployment of "
            f"{code(source)} (policy rule {code(rule)}), and {what} could not be resolved to a "
            f"commit deployed there. Name a full commit SHA. {history} Nothing was started."
        )
    return (
        f":no_entry: {code(pipeline)} takes only commits that passed a deployment of "
        f"{code(source)} (policy rule {code(rule)}): {code(sha)} has not. {history} "
        "Nothing was started."
    )
