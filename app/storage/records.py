"""The typed records and enums the store reads and writes (no caller sees Redis's raw shapes)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict


class MessageTarget(BaseModel):
    """One channel's message about a build: who asked (if anyone) and where it lives."""

    model_config = ConfigDict(extra="ignore")

    channel: str
    #: The Slack user who started it from Slack; None for a build announced by routing.
    requester: str | None = None
    #: The Slack thread this message lives in (a rebuild joins its original's thread).
    thread_ts: str | None = None
    #: The message itself, once posted.
    ts: str | None = None
    #: A digest of the message as last sent, so an unchanged message is not edited again.
    rendered: str = ""
    #: The requester's response_url, to tell them if the message cannot be posted.
    notify_url: str | None = None
    #: A notification route's name, for messages announced by routing.
    route: str | None = None

    @property
    def reply_thread(self) -> str | None:
        return self.thread_ts or self.ts


class TrackedBuild(BaseModel):
    """What the bot remembers about a build it follows, and its messages (one per channel)."""

    model_config = ConfigDict(extra="ignore")

    build_id: str
    pipeline: str
    number: int
    phase: str = ""
    gen: int = 0
    snapshot: dict[str, Any] = {}
    #: The build's jobs were retried from Slack (by a person or automatically).
    retried: bool = False
    targets: list[MessageTarget] = []

    def target(self, channel: str) -> MessageTarget | None:
        return next((t for t in self.targets if t.channel == channel), None)


class AwaitedBuild(BaseModel):
    """A create or rebuild sent to Buildkite whose build the bot has not seen yet, and where
    its message goes once it appears (whichever process finds it)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str
    pipeline: str
    #: The build rebuilt, for a rebuild (whose new build names it in `rebuilt_from`); None for
    #: a create (whose build carries `request_id` in its meta_data).
    rebuild_of: int | None = None
    #: When the request was sent (unix time).
    sent_at: float
    #: Given up after this (unix time).
    until: float
    target: MessageTarget


@dataclass(frozen=True)
class PollState:
    """What one poll cycle leaves for the next, whichever process runs it (times: unix seconds)."""

    #: Where the next list of finished builds starts (`finished_from`).
    finished_from: float | None = None
    #: When the last list of active builds was fetched, and when the next one is due.
    active_at: float | None = None
    active_due: float | None = None
    #: No poll before this moment (backing off), after `failures` failed cycles in a row.
    resume_at: float | None = None
    failures: int = 0
    #: Why the poller is backing off; empty when it is not.
    backoff: str = ""


@dataclass(frozen=True)
class Transition:
    """One change of a tracked build's phase, read from the events stream.

    `channel` is set when only that channel's message is concerned (it just joined the build).
    """

    entry_id: str
    build_id: str
    old: str
    new: str
    gen: int
    channel: str | None = None


class PhaseOutcome(StrEnum):
    """What one `observe` call did to a build's recorded phase."""

    #: This call moved the phase forward (and emitted the transition).
    CHANGED = "changed"
    #: The same phase again, or a build not tracked: nothing to do.
    UNCHANGED = "unchanged"
    #: The phase given is earlier than the one recorded: nothing changed, confirm it first.
    REGRESSED = "regressed"


@dataclass(frozen=True, slots=True)
class Observation:
    """The answer of `observe`; `previous` is the phase this call moved the build from."""

    outcome: PhaseOutcome
    previous: str = ""

    @classmethod
    def changed(cls, previous: str) -> Observation:
        return cls(PhaseOutcome.CHANGED, previous)


UNCHANGED = Observation(PhaseOutcome.UNCHANGED)
REGRESSED = Observation(PhaseOutcome.REGRESSED)


class PipelineLock(BaseModel):
    """A person's deploy lock on a pipeline (times: unix seconds)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pipeline: str
    user: str
    reason: str = ""
    since: float
    expires_at: float | None = None
    #: Where it was taken, so that the channel hears when it expires.
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class ExpiredLock:
    """A lock whose expiry a sweep took to tell its channel of."""

    lock: PipelineLock
    #: An earlier sweep tried to tell of it: its post may have been made.
    tried: bool
    #: The lock as the expiry index holds it (to mark it told, or to give it back).
    entry: str


class PendingDeploy(BaseModel):
    """A deploy waiting for its requester's confirmation or for an approval.

    `plan` is the deploy's plan as its owner (app.core) wrote it; the store keeps it as it is.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    plan: dict[str, Any]
    #: The requester's display name and the channel's name, as Slack sent them.
    user_name: str | None = None
    channel_name: str | None = None


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    #: Approved, but the deploy was refused when rechecked (policy, lock, pipeline gone).
    REFUSED = "refused"
    EXPIRED = "expired"


class Approval(BaseModel):
    """A deploy waiting for a second person's approval, and where its message lives."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request: PendingDeploy
    status: ApprovalStatus
    expires_at: float
    #: The approval request's message, once posted ("" until then).
    channel: str = ""
    ts: str = ""
    decided_by: str = ""


class ApprovalOutcome(BaseModel):
    """Where an approval stands for whoever waits on it: its status and, once settled, the
    build it started or why it started none."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: ApprovalStatus
    expires_at: float
    #: The decision has taken effect (a build started, or a refusal noted).
    settled: bool = False
    build: int | None = None
    problem: str | None = None
    #: The kept deploy request (JSON, as `Approvals` wrote it).
    request: str = ""


class ApprovalDecision(StrEnum):
    """What `decide_approval` found: this call decided it, or why it did not."""

    DECIDED = "decided"
    #: This very call found it expired (so its message needs updating).
    EXPIRED_NOW = "expired_now"
    APPROVED = "approved"
    REJECTED = "rejected"
    REFUSED = "refused"
    EXPIRED = "expired"
    MISSING = "missing"

    @property
    def status(self) -> str:
        """The approval's status in words ("expired" for EXPIRED_NOW)."""
        return "expired" if self is ApprovalDecision.EXPIRED_NOW else self.value


class AuditEntry(BaseModel):
    """One line of the audit trail (every field text, as kept in the stream)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: Unix time, to the millisecond. A field missing from an entry reads as "?" where a
    #: person would see a gap.
    time: str = "0"
    user: str = "?"
    action: str = "?"
    pipeline: str = ""
    #: The build's number, or "".
    build: str = ""
    channel: str = ""
    outcome: str = "?"
    url: str = ""
    detail: str = ""


class SupersededBy(BaseModel):
    """The newer build of a branch that passed or was unblocked, superseding older blocked ones."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    number: int
    url: str | None = None
    #: The policy's `superseded` for the blocked build, when it was superseded: refuse, warn
    #: (its Unblock asks to confirm) or cancel.
    mode: str = "refuse"
