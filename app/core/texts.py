"""What the core's services tell people in more than one place, worded once."""

from __future__ import annotations

TRACKING_DOWN = (
    ":warning: Tracking is unavailable right now (the bot cannot reach its Redis), "
    "so nothing was started. Please try again in a minute."
)

NAME_A_CLUSTER = (
    "Could not create *{name}*: this Buildkite organization uses clusters, and the bot does not "
    "know which one a new pipeline joins. Set `BUILDKITE_CLUSTER_ID` (or a `cluster_id` in the "
    "pipeline template) to the cluster's id."
)
