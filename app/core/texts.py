"""What the core's services tell people in more than one place, worded once."""

from __future__ import annotations

TRACKING_DOWN = (
    ":warning: Tracking is unavailable right now (the bot cannot reach its Redis), "
    "so nothing was started. Please try again in a minute."
)
