"""What a person reads after a click in their App Home."""

from __future__ import annotations

from app.slack.mrkdwn import escape
from app.slack.render.common import build_title
from buildkite.models import Build

TITLE = "Buildkite"
PROTECTED_REBUILD = (
    "This pipeline asks for a confirmation before a rebuild: use *Rebuild* on the build's "
    "message (or `/rebuild`), where it can be shown to you."
)
STALE_CHOICE = "That choice is not valid any more; nothing was changed."


def not_yours(pipeline: str, number: int) -> str:
    return (
        f"{escape(pipeline)} #{number} is not in your Home: act on it from its build message, "
        "or with `/cancel` and `/rebuild`."
    )


def build_gone(pipeline: str, number: int) -> str:
    return (
        f"I no longer follow {escape(pipeline)} #{number} (its record is gone); use its page in "
        "Buildkite or `/cancel` and `/rebuild`."
    )


def cancel_requested(pipeline: str, build: Build) -> str:
    return f"Cancel requested for {build_title(pipeline, build)}."


def rebuild_started(pipeline: str, build: Build) -> str:
    return f"Rebuild started: {build_title(pipeline, build)}, followed in the original's thread."
