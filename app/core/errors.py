"""UserError, and the one function that explains a Buildkite error to a person."""

from __future__ import annotations

from app.slack import mrkdwn
from buildkite.errors import (
    AuthenticationError,
    BadRequest,
    BuildkiteError,
    BuildkiteUnavailable,
    BuildMaybeStarted,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    UnexpectedResponse,
    ValidationFailed,
)


class UserError(Exception):
    """A request that could not be done, with an explanation for the person who asked."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)


def explain(
    exc: BuildkiteError,
    *,
    action: str,
    pipeline: str,
    number: int | None = None,
    organisation: bool = False,
) -> str:
    """A human explanation of a Buildkite failure: which pipeline, which scope, what to do.

    `organisation`: `pipeline` is the organisation's slug (a listing across its pipelines).
    """
    slug = mrkdwn.code(pipeline)
    what = f"{slug} #{number}" if number is not None else slug
    if isinstance(exc, NotFound):
        if number is not None:
            return f"Build #{number} of pipeline {slug} was not found."
        return (
            f"{'Organisation' if organisation else 'Pipeline'} {slug} was not found in this "
            "Buildkite organisation. "
            "Check the slug in the pipeline's Buildkite URL."
        )
    if isinstance(exc, PermissionDenied):
        if exc.missing_scope:
            return (
                f"Could not {action} {what}: the bot's Buildkite API token lacks the "
                f"{mrkdwn.code(exc.missing_scope)} scope. An admin can add it to the token in "
                "Buildkite's API Access Tokens settings."
            )
        return f"Could not {action} {what}: Buildkite says the bot's token may not do that (403)."
    if isinstance(exc, AuthenticationError):
        return (
            f"Could not {action} {what}: Buildkite rejected the bot's API token (401). "
            "An admin should check BUILDKITE_API_TOKEN."
        )
    if isinstance(exc, ValidationFailed | BadRequest):
        details = ", ".join(
            f"{e.get('field', '?')} {e.get('code', 'invalid')}" for e in exc.errors if e
        )
        reason = mrkdwn.escape(exc.message + (f" ({details})" if details else ""))
        return f"Buildkite refused to {action} {what}: {reason}."
    if isinstance(exc, RateLimited):
        wait = f" in about {int(exc.reset)} s" if exc.reset else " in a minute"
        return (
            f"Could not {action} {what}: the Buildkite API rate limit is used up. "
            f"Please try again{wait}."
        )
    if (
        isinstance(exc, ServerError | BuildkiteUnavailable)
        and exc.method not in ("GET", "HEAD")
        and getattr(exc, "reached", True)
    ):
        # A write is not sent again after an answer that was lost: it may have been done.
        return (
            f"Buildkite's answer to {action} {what} was lost, so it may have been done; it was "
            "not sent again. Check the build in Buildkite before trying again."
        )
    if isinstance(exc, BuildMaybeStarted):
        return (
            f"Buildkite did not confirm {action} {what}, so it may have started; it was not sent "
            "again. Check the pipeline's builds in Buildkite before trying again."
        )
    if isinstance(exc, UnexpectedResponse):
        return f"Could not {action} {what}: Buildkite sent an answer the bot did not understand."
    if isinstance(exc, ServerError | BuildkiteUnavailable):
        return (
            f"Could not {action} {what}: Buildkite is not answering right now. "
            "Please try again in a minute."
        )
    message = mrkdwn.escape(str(getattr(exc, "message", "") or "an unexpected error"))
    return f"Could not {action} {what}: Buildkite answered {message}."


def about_cluster(exc: BuildkiteError) -> bool:
    """Buildkite refused a pipeline for want of a cluster (said as `texts.NAME_A_CLUSTER`)."""
    if not isinstance(exc, ValidationFailed):
        return False
    named = [str(error.get("field", "")) for error in exc.errors] + [exc.message]
    return any("cluster" in text.lower() for text in named)
