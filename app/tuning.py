"""Every tuning value of the bot in one object: pacing, lock and lease times, poll budgets, waits.

Production uses the defaults. `main` passes one `Tuning` to every constructor that needs a value,
and a test passes its own (a short build lock, no Slack pacing) instead of patching module globals.
These are not settings: an operator has no reason to change them, so they are not read from the
environment. Values a person may want to change (poll interval, timeouts) live in `Settings`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SlackPacing:
    """How fast the outbox writes to Slack (Slack allows about one message a second per channel)."""

    post_interval: float = 1.0
    edit_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class TrackingTuning:
    """The notifier's locks and stream, and the poller's budgets."""

    #: A build's write lock; renewed every third of it while held.
    lock_ttl_ms: int = 30_000
    #: How often its holder renews it (a third of its life, so a missed renewal is no loss).
    lock_renew_ms: int = 10_000
    #: A transition left unacknowledged this long by a dead replica is taken over.
    reclaim_idle_ms: int = 60_000
    #: Writes to Slack in flight at once, across builds.
    max_parallel_writes: int = 64
    #: How long one read of the stream waits for a new transition; a stopping notifier waits
    #: out the read in progress.
    read_block_ms: int = 200
    #: A transition delivered this often without success is dropped (and logged).
    max_deliveries: int = 8
    #: A consumer idle this long is removed from the stream's group.
    dead_consumer_idle_ms: int = 24 * 3600 * 1000
    prune_consumers_every: float = 3600.0
    #: How long a Slack post already made is retried to be recorded through a Redis outage
    #: (left unrecorded, it would be posted again); shorter than the build lock, held meanwhile.
    record_patience: float = 15.0
    #: A pending build not seen for this many poll intervals is fetched by itself.
    stale_after_intervals: int = 4
    max_single_fetches: int = 10
    #: Overlap of the list of finished builds with the last one, for clock skew with Buildkite.
    finished_overlap: float = 120.0
    #: The next list of finished builds starts this long before the newest finish Buildkite
    #: reported (on its clock), for builds that had finished but were not listed yet.
    finished_settle: float = 30.0
    active_pages_per_minute: int = 10
    #: Polling slows down when less than this share of the rate limit is left.
    rate_limit_reserve: float = 0.2
    max_poll_backoff: float = 300.0


@dataclass(frozen=True, slots=True)
class DeployTuning:
    """The deploy queue and the waits of a person's command."""

    running: int = 4
    waiting: int = 100
    #: How long a cancelled Slack request still waits for Buildkite's answer.
    answer_on_cancel_timeout: float = 2.0
    approval_sweep_interval: float = 5.0
    #: How long a modal submission waits for Buildkite before closing and answering later.
    submit_wait: float = 2.0


@dataclass(frozen=True, slots=True)
class SweepTuning:
    """How often the loops that watch the clock look: freeze announcements, lock reminders."""

    freeze_interval: float = 30.0
    lock_interval: float = 60.0
    #: How often one replica asks Buildkite how the ledger's unfollowed running deployments
    #: (recorded by `ledger rebuild`) ended; the least wait between two asks about one build.
    ledger_interval: float = 60.0
    #: A deployment still running this long after it started (a build left blocked, say) is
    #: no longer asked about: it stays `running` until a `ledger rebuild` after its end.
    ledger_give_up_after: float = 2 * 86400.0
    #: An end of freeze (or a lock's expiry) missed for longer than this, while no bot ran,
    #: is no longer announced: it would be news of the past.
    announce_late: float = 3600.0
    #: How long the process that marks a build superseded has to follow it up (its message,
    #: its cancel) before the sweep of every `superseded_interval` takes that over.
    superseded_lease: float = 120.0
    superseded_interval: float = 30.0
    #: How long the replica that claimed a freeze announcement has
    #: to post it before another replica's sweep may (the first died); that one looks for the
    #: post in Slack first.
    announce_lease: float = 120.0
    #: The same for a lock's expiry note, which the sweep posts itself, after any posts queued
    #: before it in the outbox's channel: Slack's client waits out up to 5 429s in one call
    #: (`create_slack_client`), each for Slack's Retry-After (seconds, up to a minute or so),
    #: so a post can take minutes. Shorter, another replica would take the note over while the
    #: first still posts, and both would post. A crashed replica's note is still told after it,
    #: well within `announce_late`.
    lock_expiry_lease: float = 600.0


@dataclass(frozen=True, slots=True)
class AgentTuning:
    """What agents' (MCP) reads cost, and how their waits wake."""

    #: How long a build read for agents is answered from Redis (a chatty agent cannot spend the
    #: organisation's Buildkite rate limit).
    read_cache: float = 2.0
    #: Listings (pipelines, builds, agents, the health digest) are kept longer.
    list_cache: float = 10.0
    #: A wait re-reads the record this often besides waking on announcements (a lost one, or a
    #: Redis Cluster without pub/sub, only delays it).
    wait_recheck: float = 1.0
    #: The longest wait a tool call may ask for (the SDK's clients time out at 60 s).
    max_wait: float = 50.0
    #: How long a retried call waits for the first one's result before saying it still runs.
    duplicate_patience: float = 10.0


@dataclass(frozen=True, slots=True)
class InboxTuning:
    """App Home and DMs: how often a person's Home may be republished."""

    #: At most one Home publish per person in this many seconds (a burst of changes collapses).
    home_debounce: float = 5.0
    #: How many of a person's builds their Home lists.
    home_builds: int = 10
    #: users.info answers (email, timezone) are kept this long in memory.
    people_ttl: float = 600.0
    #: How often the summaries of DMs held during quiet hours are looked for.
    dm_sweep_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class Tuning:
    slack: SlackPacing = field(default_factory=SlackPacing)
    tracking: TrackingTuning = field(default_factory=TrackingTuning)
    deploys: DeployTuning = field(default_factory=DeployTuning)
    agents: AgentTuning = field(default_factory=AgentTuning)
    inbox: InboxTuning = field(default_factory=InboxTuning)
    #: How long a stopping bot waits for work in flight.
    shutdown_grace: float = 10.0
    #: While Redis is down, the loops log that it still is at most this often.
    redis_outage_log_every: float = 60.0
    sweeps: SweepTuning = field(default_factory=SweepTuning)
    #: The wall clock (unix seconds) of freezes, lock reminders and quiet hours; a test passes
    #: its own.
    clock: Callable[[], float] = time.time


#: What production runs with.
DEFAULT = Tuning()
