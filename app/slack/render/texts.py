"""What the core's services tell people (refusals, partial successes), worded in one place.

Pure functions from facts to mrkdwn text; what Buildkite errors mean is `errors.explain`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.slack.mrkdwn import code, escape, link, person, plain, typed
from app.slack.render.deploys import locked_text

TRACKING_DOWN = (
    ":warning: Tracking is unavailable right now (the bot cannot reach its Redis), "
    "so nothing was started. Please try again in a minute."
)

NAME_A_CLUSTER = (
    "Could not create *{name}*: this Buildkite organization uses clusters, and the bot does not "
    "know which one a new pipeline joins. Set `BUILDKITE_CLUSTER_ID` (or a `cluster_id` in the "
    "pipeline template) to the cluster's id."
)

CONFIRMATION_GONE = "This confirmation has expired or was already used; nothing was done."
APPROVAL_GONE = "This approval request no longer exists."
STEP_GONE = "That block step is not part of this build any more."
NOTHING_TO_CHANGE = "Nothing to change: give `field=value` words, or leave them out for a form."
WHOLE_AUDIT_FOR_ADMINS = "Only admins can see the whole audit trail; name a pipeline."


# -- asking twice ------------------------------------------------------------------------------


def already_asked(first: str, user_id: str) -> str:
    """The request is being handled: asked by `first` (maybe the same person) a moment ago."""
    if first == user_id:
        return ":hourglass_flowing_sand: You already asked for this; it is being handled."
    return f":hourglass_flowing_sand: {person(first)} already asked for this a moment ago."


def already_asked_admin(first: str, user_id: str) -> str:
    """The same, for a /buildkite change."""
    who = "You" if first == user_id else person(first)
    return (
        f":hourglass_flowing_sand: {who} already asked for this a moment ago; it is being handled."
    )


# -- policy and locks --------------------------------------------------------------------------


def refused(reason: str) -> str:
    return f":no_entry: {reason}"


def env_refused(refusal: str) -> str:
    return f":no_entry: {refusal} Nothing was started."


def locked(pipeline: str, holder: str, reason: str | None) -> str:
    return (
        locked_text(pipeline, holder, reason)
        + " Ask them to `/deploy unlock` it when they are done."
    )


def locked_reason(pipeline: str, holder: str, reason: str | None) -> str:
    """A lock as the reason an approved deploy did not start."""
    return (
        locked_text(pipeline, holder, reason).removeprefix(":lock: ")
        + " Ask again once it is unlocked."
    )


def already_locked(pipeline: str, holder: str) -> str:
    return f":lock: `{pipeline}` is already locked by {person(holder)}."


def not_locked(pipeline: str) -> str:
    return f"`{pipeline}` is not locked."


def only_holder_unlocks(pipeline: str, holder: str) -> str:
    return f"Only {person(holder)}, who locked `{pipeline}`, or an admin can unlock it."


def unlocked(user_id: str, pipeline: str) -> str:
    return f":unlock: {person(user_id)} unlocked `{pipeline}`."


def audit_for_deployers(pipeline: str) -> str:
    return f"Only admins and those who may deploy `{pipeline}` can see its audit trail."


# -- starting builds ---------------------------------------------------------------------------


def started_untracked(title: str) -> str:
    return (
        f":warning: Your build was started: {title}, but tracking is unavailable right "
        "now (the bot cannot reach its Redis), so its progress will not be posted here. "
        "Follow it in Buildkite."
    )


def maybe_started(what: str, pipeline: str, builds_url: str, *, followed: bool) -> str:
    """No answer to a create or rebuild, and no build found: it may have started."""
    follow = (
        "and will post the build here if it appears"
        if followed
        else "but cannot reach its Redis right now, so it may not post it here"
    )
    builds = link(builds_url, "the pipeline's builds")
    return (
        f":warning: Buildkite did not confirm {what} of `{pipeline}` (no answer in time, or an "
        f"error after it was sent), so it may have started. The bot did not send it again, "
        f"{follow}. Check {builds} before asking again."
    )


def approval_not_posted(pipeline: str, why: str) -> str:
    return (
        f":warning: Nothing was started: the approval request for `{pipeline}` "
        f"could not be posted. {why} Then run `/deploy` again."
    )


def only_requester(requester: str, verb: str, what: str) -> str:
    return f"Only {person(requester)}, who asked, can {verb} this {what}; nothing was changed."


def not_a_new_build(problem: str) -> str:
    return f":no_entry: Cannot rebuild it as a new build: {problem}"


def not_a_commit(number: int) -> str:
    return f"#{number}'s commit is not a commit SHA."


def not_auto_retried_locked(pipeline: str, holder: str, reason: str | None) -> str:
    """A freeze stops the bot's own re-runs of a failed build too."""
    return ":hourglass: Not auto-retried: " + locked_text(pipeline, holder, reason).removeprefix(
        ":lock: "
    )


def not_auto_retried_budget(pipeline: str, budget: int) -> str:
    return (
        f":hourglass: Not auto-retried: `{pipeline}` used its budget of "
        f"{budget} automatic retries this hour."
    )


# -- approvals ---------------------------------------------------------------------------------


def no_self_approval(approvers: Sequence[str]) -> str:
    return (
        "You cannot approve your own deploy: someone else from "
        f"{', '.join(approvers) or 'the approvers'} has to."
    )


def no_agent_self_approval(approvers: Sequence[str]) -> str:
    return (
        "You cannot approve this deploy: the agent asking acts for you, so it would be your own. "
        f"Someone else from {', '.join(approvers) or 'the approvers'} has to."
    )


def no_agent_approvers(pipeline: str, rule: str) -> str:
    return (
        f"`{pipeline}` is protected, so an agent's deploy needs a person's approval, but policy "
        f"rule {code(rule)} names nobody who could give it (no approval, deployers or admins). "
        "Nothing was started."
    )


def only_approvers(approvers: Sequence[str], action: str) -> str:
    return f"Only {', '.join(approvers) or 'the approvers'} may {action} this deploy."


def already_decided(state: str) -> str:
    return f"This deploy request was already {state}; nothing was done."


def approved_not_started(reason: str) -> str:
    return f":no_entry: Approved, but not started: {reason}"


def no_longer_allowed(requester: str, action: str, pipeline: str, channel: str, rule: str) -> str:
    return (
        f"{person(requester)} may no longer {action} `{pipeline}` from "
        f"<#{channel}> (policy rule {code(rule)})."
    )


def pipeline_gone(pipeline: str) -> str:
    return f"pipeline `{pipeline}` no longer exists in Buildkite."


# -- build actions -----------------------------------------------------------------------------


def nothing_to_cancel(title: str, state: str) -> str:
    return f"{title} already finished ({state}); there is nothing to cancel."


def step_not_waiting(label: str, state: str | None) -> str:
    return f"*{plain(label)}* is not waiting any more ({escape(state or 'unknown')})."


def steps_unreadable(scope: str | None) -> str:
    """Why an unblock form could not be read from the pipeline."""
    return "the bot could not read the pipeline's steps" + (
        f" (its token lacks the `{scope}` scope)" if scope else ""
    )


def unblocked_not_shown(label: str, why: str) -> str:
    return f":unlock: Unblocked *{plain(label)}*. {why}"


def no_failed_jobs(title: str) -> str:
    return f"{title} has no failed jobs to retry."


def retrying_not_shown(title: str, why: str) -> str:
    return (
        f":repeat: Retrying the failed jobs of {title}, but its progress cannot be shown here. "
        f"{why}"
    )


# -- /buildkite --------------------------------------------------------------------------------


def no_admins(what: str, source: str) -> str:
    return (
        f":no_entry: Only admins may {what}, and the deploy policy names none. Add Slack "
        f"user ids (U…) or user groups (S…) under `admins:` in the policy file "
        f"(`{source}`, see POLICY_FILE) and restart the bot."
    )


def only_admins(what: str, who: str) -> str:
    return f":no_entry: Only admins may {what}: {who}."


def no_agent_stoppers(source: str) -> str:
    return (
        ":no_entry: Only admins and the policy's `agent_stoppers` may stop agents, and "
        "the deploy policy names neither. Add Slack user ids (U…) or user groups (S…) "
        f"under `admins:` or `agent_stoppers:` in the policy file (`{source}`, see "
        "POLICY_FILE) and restart the bot."
    )


def only_agent_stoppers(who: str) -> str:
    return f":no_entry: Only these may stop agents: {who}."


def agent_gone(name: str) -> str:
    return f"The agent `{typed(name)}` is not connected any more; nothing to stop."
