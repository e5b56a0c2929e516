"""A build's phase and rank in its life, its stored snapshot, and the reply a phase deserves.

Pure helpers shared by the intake (which compares phases), the notifier and the poller.
"""

from __future__ import annotations

import os
import socket
import uuid

from app.storage.keys import FINAL_RANK
from app.storage.records import TrackedBuild
from buildkite.models import Build, BuildState

_SNAPSHOT_FIELDS = {
    "id",
    "source",
    "author",
    "creator",
    "number",
    "state",
    "blocked",
    "web_url",
    "message",
    "commit",
    "branch",
    "created_at",
    "started_at",
    "finished_at",
}

_RANKS = {
    BuildState.CREATING: 1,
    BuildState.SCHEDULED: 1,
    BuildState.RUNNING: 2,
    BuildState.FAILING: 3,
    BuildState.CANCELING: 5,
}
BLOCKED_RANK = 4
#: The phases of a finished build.
FINAL_PHASES = frozenset(s.value for s in BuildState if s.is_terminal)


def phase_of(build: Build) -> tuple[str, int]:
    """A build's phase (its state, marked when on a block step) and its rank in a build's life."""
    if build.is_final:
        return build.state.value, FINAL_RANK
    if build.is_waiting_on_block:
        return f"{build.state.value}:blocked", BLOCKED_RANK
    return build.state.value, _RANKS.get(build.state, 2)


def reply_kind(phase: str) -> str | None:
    """Which thread reply a phase deserves: the thread only hears of running, failing, final."""
    if phase == BuildState.RUNNING.value:
        return "running"
    if phase == BuildState.FAILING.value:
        return "failing"
    if phase in FINAL_PHASES:
        return "final"
    return None


def snapshot(build: Build) -> dict[str, object]:
    return build.model_dump(mode="json", include=_SNAPSHOT_FIELDS)


def rank_of(tracked: TrackedBuild) -> int:
    """The rank of the phase last recorded for a build (0 for one this code does not know)."""
    phase = tracked.phase
    if phase.endswith(":blocked"):
        return BLOCKED_RANK
    if phase in FINAL_PHASES:
        return FINAL_RANK
    try:
        return _RANKS.get(BuildState(phase), 2)
    except ValueError:
        return 0


def process_name() -> str:
    """A name for this process, new at each start: its stream consumer and its poll lease."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
