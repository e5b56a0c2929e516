"""What the listeners answer the person who typed or clicked: acks, ephemeral replies and
modal notices, worded in one place (the core's refusals are in `texts`)."""

from __future__ import annotations

from collections.abc import Iterable

from app.slack.mrkdwn import code, link, plain

# -- every surface -------------------------------------------------------------------------------


def with_usage(problem: object, usage: str) -> str:
    """A command that could not be read: what is wrong, then how to write it."""
    return f"{problem}\n\n{usage}"


def bot_failed(ref: str) -> str:
    """An unexpected error, with the reference of the ERROR line logged for it."""
    return (
        # At most 150 characters: it must fit a modal's field error whole.
        f":boom: Something went wrong on the bot's side (ref `{ref}`). Nothing more will "
        "happen for this request; an admin can find it in the bot's logs."
    )


def bot_failed_in_modal(ref: str) -> str:
    return f":boom: Something went wrong on the bot's side (ref `{ref}`)."


# -- /deploy, /cancel, /rebuild and the build buttons ----------------------------------------------


def started(build_url: str | None, pipeline: str | None, number: int) -> str:
    title = link(build_url, f"{pipeline or 'build'} #{number}")
    return f":rocket: Started {title}. Its progress will be posted here."


def starting(pipeline: str, position: int) -> str:
    """The ack of /deploy: its place in line (0 when it starts at once). It is sent before the
    policy and the pipeline are checked, so it promises no build."""
    if position == 0:
        return (
            f":hourglass_flowing_sand: Starting a build of `{pipeline}` if it exists and you may "
            "deploy it…"
        )
    return (
        f":hourglass_flowing_sand: Many deploys are starting right now; yours of `{pipeline}` "
        f"is number {position} in line and starts in turn, if you may deploy it…"
    )


def too_many_deploys(pipeline: str) -> str:
    return (
        f":no_entry: Too many deploys are starting right now, so `{pipeline}` was not deployed "
        "and nothing was started. Please try again in a minute."
    )


def interrupted_shutdown(pipeline: str) -> str:
    return (
        f":warning: The bot restarted while starting your deploy of `{pipeline}`: it may or may "
        "not have started. Check the pipeline's builds in Buildkite before running the command "
        "again."
    )


def not_started_shutdown(pipeline: str) -> str:
    return (
        f":warning: The bot restarted before your deploy of `{pipeline}` could start, so "
        "nothing was started. Please run the command again."
    )


def canceling(pipeline: str, number: int) -> str:
    return f":hourglass_flowing_sand: Canceling `{pipeline}` #{number}…"


def showing_protected(pipeline: str, number: int) -> str:
    """The ack of /rebuild on a protected pipeline: a confirmation comes first."""
    return f":shield: `{pipeline}` is protected: showing #{number} first…"


def rebuilding(pipeline: str, number: int) -> str:
    return f":hourglass_flowing_sand: Rebuilding `{pipeline}` #{number}…"


def cancel_requested(build_url: str | None, pipeline: str, number: int) -> str:
    return f":no_entry_sign: Cancel requested for {link(build_url, f'{pipeline} #{number}')}."


def rebuild_started(build_url: str | None, pipeline: str, number: int) -> str:
    title = link(build_url, f"{pipeline} #{number}")
    return f":repeat: Rebuild started: {title}. Follow it in the thread."


APPROVAL_REQUESTED = (
    ":raised_hand: Approval requested in the channel; the deploy starts once "
    "someone else approves it."
)
DEPLOY_ABORTED = "Deploy canceled; nothing was started."
REJECTED = ":no_entry: Rejected; nothing was started."


def approved(build_url: str | None, pipeline: str | None, number: int) -> str:
    title = link(build_url, f"{pipeline or 'build'} #{number}")
    return f":white_check_mark: Approved. Started {title}."


# -- Unblock and Retry failed jobs -----------------------------------------------------------------

UNBLOCK_TITLE = "Unblock"
#: An unblock modal whose metadata the bot cannot read (not its own, or from an older version).
STALE_UNBLOCK_FORM = "This form is not valid any more; nothing was done. Click *Unblock* again."
#: Buildkite's 422 code for a field left empty, in words.
MISSING_FIELD = "missing field (a value is required)"


def unblocked(label: str) -> str:
    return f":unlock: Unblocked *{plain(label)}*."


def unblock_refused(message: str) -> str:
    return f"Unblock refused: {plain(message)}"


def buildkite_says(problems: Iterable[str]) -> str:
    """Buildkite's refusal of a submitted form, under one of its inputs."""
    return f"Buildkite says: {'; '.join(problems)}"[:150]


def retrying(jobs: Iterable[tuple[str | None, str]]) -> str:
    """Retry failed jobs answered: each (web_url, name) of the jobs retried, linked."""
    names = ", ".join(link(url, name) for url, name in jobs)
    return f":repeat: Retrying {names}. Follow it in the thread."


# -- /buildkite ----------------------------------------------------------------------------------

PIPELINE_TITLE = "Pipeline"
STALE_FORM = "This form's data is not valid any more; nothing was done. Run the command again."
#: The channel post about a pipeline change failed (the outbox logged why, with the fix).
NOT_ANNOUNCED = (
    "It could not be announced in this channel: if the bot is not in it, invite it with "
    "`/invite @buildkite`."
)
READING_BUILDS = ":hourglass_flowing_sand: Reading the builds…"
CREATING_PIPELINE = ":hourglass_flowing_sand: Creating the pipeline…"
UPDATING_PIPELINE = ":hourglass_flowing_sand: Updating the pipeline…"
WORKING = "Working on it…"


def pipeline_form_title(*, updating: bool) -> str:
    return "Update pipeline" if updating else "New pipeline"


def pipeline_not_announced(verb: str, web_url: str | None, slug: str) -> str:
    """A pipeline was created or updated (`verb`), but the channel was not told."""
    return f"{verb} the pipeline {link(web_url, slug)}. {NOT_ANNOUNCED}"


def pipeline_saved(verb: str, web_url: str | None, slug: str) -> str:
    return f":white_check_mark: {verb} {link(web_url, slug)}."


def pipeline_deleted(slug: str, *, announced: bool) -> str:
    note = "" if announced else f" {NOT_ANNOUNCED}"
    return f":wastebasket: Deleted the pipeline `{slug}`.{note}"


def agent_stopping(name: str, *, force: bool) -> str:
    if force:
        return f":octagonal_sign: Force-stopped {code(name)}; its job was canceled."
    return f":octagonal_sign: Asked {code(name)} to stop once its current job finishes."
