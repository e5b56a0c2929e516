"""What people read about freezes: the refusal of a frozen deploy, `/deploy freezes`, the start
and end announcements, and the break-glass request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.slack.mrkdwn import code, person, plain
from app.slack.render.common import SECTION_TEXT_LIMIT, clip

#: At most this many freezes listed in each part of `/deploy freezes`.
MAX_LISTED = 20


@dataclass(frozen=True)
class FreezeView:
    """One occurrence of a freeze, as shown: times are unix seconds, `*_text` their fallback
    in the freeze's own time zone."""

    reason: str
    window: str
    pipelines: tuple[str, ...]
    start: float
    end: float
    start_text: str
    end_text: str
    #: The last of the freezes that follow this one without a gap: deploys wait for its end.
    then: FreezeView | None = None


def when(timestamp: float, fallback: str) -> str:
    """A Slack date token that each reader sees in their own time zone, with the freeze's
    wall-clock time for clients that cannot show it."""
    return f"<!date^{int(timestamp)}^{{date_short_pretty}} {{time}}|{plain(fallback)}>"


def reason_text(reason: str, limit: int = 300) -> str:
    """A freeze's reason from the policy file, as literal text: an inline code span, in which
    Slack applies no `*bold*`, `_italic_` or `~strike~` and which `code` escapes (`<!channel>`,
    `&`) and keeps its backticks from ending."""
    return code(clip(reason, limit))


def _what(view: FreezeView) -> str:
    return f"{reason_text(view.reason)} ({plain(view.window)})"


#: What each refused action is called in a refusal (the policy's and the audit's names).
_NOUNS = {
    "promote": "promotion",
    "retry": "retry of the failed jobs",
}
#: How a person breaks the glass for an action; the others have no break-glass of their own.
_BREAK_GLASS = {
    "deploy": "`/deploy {p} … --break-glass <reason>` asks a second person to approve it.",
    "rollback": "`/deploy rollback {p} [to #N] --break-glass <reason>` asks a second person to "
    "approve it.",
    "promote": "`/deploy promote {p} --break-glass <reason>` asks a second person to approve it.",
    "promotion": "`/deploy promote {p} --break-glass <reason>` asks a second person to approve it.",
}
_DEPLOY_INSTEAD = (
    "`/deploy {p} … --break-glass <reason>` asks a second person to approve a deploy instead."
)


def action_noun(action: str) -> str:
    """A refused action as a refusal names it: deploy, rebuild, retry of the failed jobs,
    rollback, promotion, automatic retry."""
    return _NOUNS.get(action, action)


def _pipelines(view: FreezeView) -> str:
    return ", ".join(code(p) for p in view.pipelines[:10]) + (
        ", …" if len(view.pipelines) > 10 else ""
    )


def frozen(pipeline: str, action: str, view: FreezeView, *, break_glass: bool = True) -> str:
    """Why `action` (deploy, rebuild, retry, rollback, promote, or their nouns) is refused: the
    freeze, its reason, and when it ends; and the break-glass, for a person (an agent has
    none)."""
    until = f"until {when(view.end, view.end_text)}"
    if view.then is not None:  # another freeze follows on: the end that matters is its
        then = view.then
        until += (
            f", and then {_what(then)} until {when(then.end, then.end_text)}, with no gap "
            "between them"
        )
    refused = (
        f":snowflake: {code(pipeline)} is frozen: {_what(view)}, {until}. "
        f"The {action_noun(action)} was not started."
    )
    if not break_glass:
        return f"{refused} An agent cannot break the glass: a person may, with `--break-glass`."
    how = _BREAK_GLASS.get(action, _DEPLOY_INSTEAD).format(p=pipeline)
    return f"{refused} In an emergency, {how}"


def not_frozen(pipeline: str) -> str:
    return (
        f"{code(pipeline)} is not frozen now: `--break-glass` is only for a freeze. "
        "Ask again without it."
    )


def no_break_glass_approvers(pipeline: str) -> str:
    return (
        f"A break-glass deploy of {code(pipeline)} needs a second person to approve it, and "
        "the policy names nobody but you: set the rule's `approval.approvers`, or `admins`."
    )


def break_glass_pending(pipeline: str, channel: str) -> str:
    """A second `--break-glass` while the person's first one waits for approval."""
    where = f" in <#{channel}>" if channel else ""
    return (
        f"You already asked to break the glass on {code(pipeline)}, and that request waits "
        f"for approval{where}: it was not asked again. Once it is decided or expired, you may "
        "ask anew."
    )


def break_glass_announcement(
    requester: str,
    pipeline: str,
    reason: str,
    view: FreezeView | None,
    approvers: Sequence[str],
    *,
    asks: str | None = None,
) -> str:
    """The in-channel note that someone asks to deploy (or `asks`: roll back …, promote …)
    through a freeze, and why."""
    during = f" during the freeze {_what(view)}" if view is not None else ""
    asks = asks or f"deploy {code(pipeline)}"
    return (
        f":rotating_light: *Break-glass:* {person(requester)} asks to {asks}{during}. "
        f"Reason: {clip(plain(reason), 300)}\n"
        f"It starts only once approved by {', '.join(approvers) or 'nobody'} (not the requester)."
    )


def break_glass_freeze_changed(pipeline: str, asked_in: str, view: FreezeView) -> str:
    """Why an approved break-glass request did not start: the freeze in force now is not the
    one it was asked in (another freeze, or a later occurrence of the same one)."""
    return (
        f"the break-glass was asked during the freeze {code(asked_in)}, but {code(pipeline)} "
        f"is now frozen by {_what(view)} since {when(view.start, view.start_text)}, until "
        f"{when(view.end, view.end_text)}. An approval given for one freeze does not carry over "
        "to another one, nor to a later occurrence of the same one: if it is still an "
        "emergency, ask again with `--break-glass`."
    )


def break_glass_refused_notice(requester: str, pipeline: str, why: str) -> str:
    """Told to the requester, in the approval's thread, when their approved break-glass
    request ends without a build."""
    who = person(requester)
    return f":no_entry: {who}, your break-glass request on {code(pipeline)} ended: {why}"


def freeze_started(view: FreezeView, *, late: bool = False) -> str:
    """A freeze's start; `late` when no bot saw it start (it began a while ago)."""
    news = (
        f"A freeze is in force since {when(view.start, view.start_text)}"
        if late
        else "A freeze starts"
    )
    return (
        f":snowflake: {news}: {_what(view)}. Deploys of {_pipelines(view)} are refused "
        f"until {when(view.end, view.end_text)}."
    )


def freeze_ended(view: FreezeView, still: FreezeView | None = None) -> str:
    """A freeze's end; `still` another freeze in force on some of its pipelines then."""
    if still is not None:
        return (
            f":snowflake: The freeze {_what(view)} has ended, but {_what(still)} is in force "
            f"until {when(still.end, still.end_text)}: deploys of {_pipelines(still)} are "
            "still refused."
        )
    return f":sunny: The freeze {_what(view)} has ended: {_pipelines(view)} may be deployed again."


def freezes_list(active: Sequence[FreezeView], upcoming: Sequence[FreezeView]) -> str:
    """`/deploy freezes`: the freezes in force, and each freeze's next occurrence."""
    if not active and not upcoming:
        return ":sunny: No freeze is in force, and none is coming in the next 60 days."
    lines = []
    if active:
        lines.append(":snowflake: *Frozen now:*")
        lines += [
            f"• {_what(v)}: {_pipelines(v)}, until {when(v.end, v.end_text)}"
            for v in active[:MAX_LISTED]
        ]
    else:
        lines.append(":sunny: No freeze is in force now.")
    if upcoming:
        lines.append("*Coming:*")
        lines += [
            f"• {_what(v)}: {_pipelines(v)}, from {when(v.start, v.start_text)} "
            f"to {when(v.end, v.end_text)}"
            for v in upcoming[:MAX_LISTED]
        ]
    return clip("\n".join(lines), SECTION_TEXT_LIMIT)
