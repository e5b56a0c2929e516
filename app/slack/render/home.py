"""A person's App Home tab: My builds, Waiting for me, My locks, Active freezes, My
notifications. Pure: from typed content to a `home` view."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    ButtonElement,
    ConfirmObject,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    SectionBlock,
)

from app.slack.ids import ActionId
from app.slack.mrkdwn import code, escape, person, plain
from app.slack.payloads import (
    BuildButtonValue,
    LockButtonValue,
    RequestButtonValue,
)
from app.slack.render.common import (
    SECTION_TEXT_LIMIT,
    build_title,
    clip,
    context,
    duration,
    section,
    short_commit,
    state_text,
)
from app.slack.render.deploys import DeployPlan
from app.slack.render.freezes import FreezeView, reason_text
from app.slack.render.freezes import when as date_token
from app.storage.inbox import DmMode, DmPrefs
from app.storage.records import PipelineLock
from buildkite.models import Build

#: Each section lists at most this many entries (a Home holds 100 blocks).
MAX_APPROVALS = 10
MAX_LOCKS = 10
#: Freezes in force listed, and coming ones (each freeze's next occurrence).
MAX_FREEZES = 10
MAX_COMING_FREEZES = 5

DM_MODES = {
    DmMode.OFF: "Off",
    DmMode.FAILURES: "Failures only",
    DmMode.ALL: "Every finished build",
}
#: The quiet-hours selects' "no quiet hours" choice.
NO_QUIET = "none"


@dataclass(frozen=True)
class HomeBuild:
    """One of a person's builds, with the Home buttons the policy allows them on it."""

    pipeline: str
    build: Build
    buttons: tuple[ActionId, ...] = ()


@dataclass(frozen=True)
class HomeApproval:
    approval_id: str
    plan: DeployPlan


@dataclass(frozen=True)
class HomeContent:
    user: str
    builds: Sequence[HomeBuild] = ()
    approvals: Sequence[HomeApproval] = ()
    locks: Sequence[PipelineLock] = ()
    #: The policy's freezes in force now, and each freeze's next occurrence.
    freezes: Sequence[FreezeView] = ()
    coming_freezes: Sequence[FreezeView] = ()
    prefs: DmPrefs = field(default_factory=DmPrefs)
    #: The person's Slack timezone, for their quiet hours.
    timezone: str | None = None


def _header(text: str) -> dict[str, Any]:
    return HeaderBlock(text=text).to_dict()


def _build_blocks(item: HomeBuild) -> list[dict[str, Any]]:
    build = item.build
    took = duration(build) if build.is_final else None
    parts = [
        f"*{build_title(item.pipeline, build)}*  {state_text(build)}",
        f"{code(clip(build.branch or '?', 100))} at {code(short_commit(build.commit))}"
        + (f", took {took}" if took else ""),
    ]
    blocks = [section("\n".join(parts))]
    value = BuildButtonValue(pipeline=item.pipeline, number=build.number).model_dump_json()
    buttons: list[ButtonElement] = []
    labels = {
        ActionId.HOME_UNBLOCK: "Unblock",
        ActionId.HOME_CANCEL: "Cancel",
        ActionId.HOME_REBUILD: "Rebuild",
        ActionId.HOME_RETRY: "Retry failed jobs",
    }
    for action in item.buttons:
        confirm = None
        if action is ActionId.HOME_CANCEL:
            confirm = ConfirmObject(
                title="Cancel this build?",
                text=f"Cancel {escape(item.pipeline)} #{build.number}?",
                confirm="Cancel build",
                deny="Keep it running",
            )
        buttons.append(
            ButtonElement(
                text=labels[action],
                action_id=action,
                value=value,
                style={ActionId.HOME_CANCEL: "danger", ActionId.HOME_UNBLOCK: "primary"}.get(
                    action
                ),
                confirm=confirm,
            )
        )
    if buttons:
        blocks.append(ActionsBlock(elements=buttons).to_dict())
    return blocks


def _approval_blocks(item: HomeApproval) -> list[dict[str, Any]]:
    plan = item.plan
    what = f"a rebuild of #{plan.rebuild_of}" if plan.rebuild_of else "a deploy"
    text = (
        f"{person(plan.requester)} asks for {what} of {code(plan.pipeline)}: "
        f"{code(clip(plan.branch, 100))} at {code(short_commit(plan.commit))}"
    )
    value = RequestButtonValue(id=item.approval_id).model_dump_json()
    return [
        section(text),
        ActionsBlock(
            elements=[
                ButtonElement(
                    text="Approve", action_id=ActionId.HOME_APPROVE, value=value, style="primary"
                ),
                ButtonElement(text="Reject", action_id=ActionId.HOME_REJECT, value=value),
            ]
        ).to_dict(),
    ]


def _lock_block(lock: PipelineLock) -> dict[str, Any]:
    reason = f": {clip(plain(lock.reason), 200)}" if lock.reason else ""
    return SectionBlock(
        text=MarkdownTextObject(text=clip(f"{code(lock.pipeline)}{reason}", SECTION_TEXT_LIMIT)),
        accessory=ButtonElement(
            text="Unlock",
            action_id=ActionId.HOME_UNLOCK,
            value=LockButtonValue(pipeline=lock.pipeline).model_dump_json(),
        ),
    ).to_dict()


def _freeze_line(view: FreezeView, *, coming: bool) -> str:
    pipelines = ", ".join(code(p) for p in view.pipelines[:10]) + (
        ", …" if len(view.pipelines) > 10 else ""
    )
    span = (
        f"from {date_token(view.start, view.start_text)} to {date_token(view.end, view.end_text)}"
        if coming
        else f"until {date_token(view.end, view.end_text)}"
    )
    return f"• {reason_text(view.reason)}: {pipelines}, {span}"


def _freeze_blocks(active: Sequence[FreezeView], coming: Sequence[FreezeView]) -> list[Any]:
    """The freezes in force (deploys, rebuilds, rollbacks and promotions of those pipelines are
    refused), and the next ones; two blocks at most."""
    blocks: list[Any] = []
    if active:
        lines = [":snowflake: Deploys of these pipelines are refused now:"]
        lines += [_freeze_line(v, coming=False) for v in active[:MAX_FREEZES]]
        blocks.append(section(clip("\n".join(lines), SECTION_TEXT_LIMIT)))
    else:
        blocks.append(context("No freeze is in force."))
    if coming:
        lines = ["Coming:"] + [_freeze_line(v, coming=True) for v in coming[:MAX_COMING_FREEZES]]
        blocks.append(context("\n".join(lines)))
    return blocks


def _option(label: str, value: str) -> dict[str, Any]:
    return {"text": {"type": "plain_text", "text": label}, "value": value}


# Plain dicts made once: a Home is drawn for every person on every change of their builds.
_HOUR_OPTIONS = [_option("No quiet hours", NO_QUIET)] + [
    _option(f"{hour:02d}:00", str(hour)) for hour in range(24)
]
_MODE_OPTIONS = [_option(label, mode.value) for mode, label in DM_MODES.items()]


def _select(
    action: ActionId, options: list[dict[str, Any]], chosen: str, placeholder: str
) -> dict[str, Any]:
    return {
        "type": "static_select",
        "action_id": action.value,
        "placeholder": {"type": "plain_text", "text": placeholder},
        "options": options,
        "initial_option": next(o for o in options if o["value"] == chosen),
    }


def _hour_select(action: ActionId, chosen: int | None, placeholder: str) -> dict[str, Any]:
    value = NO_QUIET if chosen is None else str(chosen)
    return _select(action, _HOUR_OPTIONS, value, placeholder)


def _prefs_blocks(prefs: DmPrefs, timezone: str | None) -> list[dict[str, Any]]:
    quiet = (
        f"from {prefs.quiet_from:02d}:00 to {prefs.quiet_to:02d}:00"
        if prefs.quiet_from is not None and prefs.quiet_to is not None
        else "none"
    )
    where = f" ({escape(timezone)})" if timezone else ""
    mode = _select(ActionId.HOME_DM_MODE, _MODE_OPTIONS, prefs.mode.value, "When to tell me")
    return [
        section("*Direct messages* when one of my builds finishes:"),
        {"type": "actions", "elements": [mode]},
        section(
            f"*Quiet hours*{where}: {quiet}. Messages due meanwhile wait, and come as one "
            "summary after."
        ),
        {
            "type": "actions",
            "elements": [
                _hour_select(ActionId.HOME_QUIET_FROM, prefs.quiet_from, "From"),
                _hour_select(ActionId.HOME_QUIET_TO, prefs.quiet_to, "To"),
            ],
        },
    ]


def home_view(content: HomeContent) -> dict[str, Any]:
    """The person's Home tab, as views.publish takes it."""
    blocks: list[dict[str, Any]] = [_header("My builds")]
    if content.builds:
        for item in content.builds:
            blocks += _build_blocks(item)
    else:
        blocks.append(
            context(
                "No builds yet: the ones you start with `/deploy`, and the ones "
                "Buildkite credits to your email, show here."
            )
        )
    blocks += [DividerBlock().to_dict(), _header("Waiting for me")]
    if content.approvals:
        for approval in content.approvals[:MAX_APPROVALS]:
            blocks += _approval_blocks(approval)
    else:
        blocks.append(context("No approval requests wait for you."))
    blocks += [DividerBlock().to_dict(), _header("My locks")]
    if content.locks:
        blocks += [_lock_block(lock) for lock in content.locks[:MAX_LOCKS]]
    else:
        blocks.append(context("You hold no pipeline lock."))
    blocks += [DividerBlock().to_dict(), _header("Active freezes")]
    blocks += _freeze_blocks(content.freezes, content.coming_freezes)
    blocks += [DividerBlock().to_dict(), _header("My notifications")]
    blocks += _prefs_blocks(content.prefs, content.timezone)
    return {"type": "home", "blocks": blocks}
