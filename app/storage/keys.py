"""Every Redis key the bot writes and every TTL it gives them, in one place.

The braces of PREFIX are a Redis Cluster hash tag: every key of the bot lives in one slot, so the
Lua scripts and transactions that touch several keys also work on a cluster.
"""

from __future__ import annotations

from buildkite.webhooks import SIGNATURE_TOLERANCE

PREFIX = "{bkchatops}:"
#: PREFIX as it must be written in key templates filled in with str.format.
TEMPLATE_PREFIX = PREFIX.replace("{", "{{").replace("}", "}}")

# -- builds ----------------------------------------------------------------------------------

#: build:{build_id} -> the build's record: one compact JSON string (laid out in `codec`),
#: with its phase, generation, snapshot, one message per channel and its posted/once markers, so
#: that a tracked build costs one key plus its number index. A string has no small/large encoding
#: cliff (a hash turns into a hashtable as soon as one value passes hash-max-listpack-value).
BUILD_KEY = TEMPLATE_PREFIX + "build:{build_id}"
#: bynum:{pipeline}:{number} -> build id, to find a tracked build from a command or URL. It lives
#: exactly as long as the build's record (the scripts extend both together).
BY_NUMBER_KEY = TEMPLATE_PREFIX + "bynum:{pipeline}:{number}"
#: Sorted set of builds still being followed; the score is when they were last observed.
PENDING_KEY = PREFIX + "pending"
#: Stream of transitions waiting to be turned into Slack messages, consumed by a group.
EVENTS_STREAM = PREFIX + "events"
EVENTS_GROUP = "notifiers"
#: Markers kept in the build's record: a thread reply was posted, or a per-build action (an
#: auto-retry) was taken, once per generation.
POSTED_MARK = "{channel}:{gen}:{kind}"
ONCE_MARK = "{gen}:{what}"
#: lock:{build_id} -> the process currently writing this build's Slack messages (its TTL is
#: `Tuning.tracking.lock_ttl_ms`).
BUILD_LOCK_KEY = TEMPLATE_PREFIX + "lock:{build_id}"
#: outcome:{pipeline}:{branch} -> the final state of the branch's last finished build.
OUTCOME_KEY = TEMPLATE_PREFIX + "outcome:{pipeline}:{branch}"
#: retries:{pipeline}:{hour} -> automatic retries spent in that hour (the hourly budget).
RETRY_BUDGET_KEY = TEMPLATE_PREFIX + "retries:{pipeline}:{hour}"

PENDING_TTL = 30 * 24 * 3600  # a build may sit on a block step for weeks
FINAL_TTL = 7 * 24 * 3600  # keep finished builds around for /rebuild threading and buttons
OUTCOME_TTL = 4 * FINAL_TTL
RETRY_BUDGET_TTL = 2 * 3600  # the hour it counts, and the next
EVENTS_MAXLEN = 100_000
#: A build's rank once it is final; see tracker.phase_of for the others.
FINAL_RANK = 6

# -- requests, clicks, webhooks, keyed posts, awaited builds -------------------------------

#: req:{id} -> who claimed a mutation request (SET NX), so a duplicate does nothing.
REQUEST_KEY = TEMPLATE_PREFIX + "req:{request_id}"
#: webhook:{timestamp}:{signature} -> a signed Buildkite webhook already received (SET NX), so a
#: replay of it within its signature's tolerance does nothing.
WEBHOOK_KEY = TEMPLATE_PREFIX + "webhook:{timestamp}:{signature}"
#: click:{id} -> a button click already handled (SET NX), by its identity: action_ts, message and
#: user. A signed click delivered again within Slack's signature window is dropped.
CLICK_KEY = TEMPLATE_PREFIX + "click:{click_id}"
#: post:{key} -> when a keyed Slack post was first attempted (unix time), until it is recorded
#: (deleted then, so it costs nothing once the post is made).
POST_ATTEMPT_KEY = TEMPLATE_PREFIX + "post:{key}"
#: Hash of request id -> JSON of a build the bot asked for without (yet) an answer (see
#: AwaitedBuild), and a sorted set of the same ids by when the poller should look for it.
AWAITED_KEY = PREFIX + "awaited"
AWAITED_DUE_KEY = PREFIX + "awaited:due"

REQUEST_TTL = 24 * 3600
ACTION_TTL = 30  # double clicks on one button within this window do one thing
#: A signature is accepted up to SIGNATURE_TOLERANCE (300 s) either side of its timestamp, so a
#: delivery can be replayed for up to 600 s after it arrives; a minute more covers clock skew
#: between replicas.
WEBHOOK_TTL = 2 * SIGNATURE_TOLERANCE + 60
CLICK_TTL = 6 * 60  # Slack's 5-minute signature window plus a minute of clock skew
POST_ATTEMPT_TTL = FINAL_TTL
#: How long a build asked for without an answer is looked for: Buildkite creates one within
#: minutes or not at all. Both awaited keys are given this TTL again on every write.
AWAITED_TTL = 3600

# -- the poller ------------------------------------------------------------------------------

#: The poller's lease, so that one process polls Buildkite per cycle.
POLL_LEASE_KEY = PREFIX + "poll:lease"
#: Hash of the poller's state, shared by every process (see PollState).
POLL_STATE_KEY = PREFIX + "poll:state"
POLL_STATE_TTL = PENDING_TTL

# -- deploy locks, confirmations, approvals, audit -----------------------------------------

#: pipelock:{pipeline} -> JSON of the deploy lock on a pipeline (optional expiry).
PIPELINE_LOCK_KEY = TEMPLATE_PREFIX + "pipelock:{pipeline}"
#: deployreq:{id} -> JSON of a deploy waiting for its requester's confirmation.
DEPLOY_REQUEST_KEY = TEMPLATE_PREFIX + "deployreq:{request_id}"
#: approval:{id} -> hash of a deploy waiting for a second person's approval.
APPROVAL_KEY = TEMPLATE_PREFIX + "approval:{approval_id}"
#: Approvals by expiry time, so that expired ones get their message updated.
APPROVAL_EXPIRY_KEY = PREFIX + "approvals:expiring"
#: Stream of audit entries (bounded).
AUDIT_STREAM = PREFIX + "audit"

DEPLOY_REQUEST_TTL = 15 * 60  # a confirmation left unanswered this long is forgotten
APPROVAL_KEEP = 24 * 3600  # an approval's record outlives its expiry by this much
AUDIT_MAXLEN = 10_000

# -- the digest ------------------------------------------------------------------------------

#: digest:lease:{schedule}:{slot} -> the process posting that slot's digest (SET NX, expires).
DIGEST_LEASE_KEY = TEMPLATE_PREFIX + "digest:lease:{schedule}:{slot}"
#: digest:last:{schedule} -> the slot (unix seconds) of the schedule's latest posted digest.
DIGEST_LAST_KEY = TEMPLATE_PREFIX + "digest:last:{schedule}"
#: A process that took a slot and died is replaced after this long (the digest is then late).
DIGEST_LEASE_TTL = 15 * 60
DIGEST_LAST_TTL = 35 * 24 * 3600  # outlives a weekly schedule's gap

# -- the release ledger ----------------------------------------------------------------------

#: ledger:{pipeline} -> sorted set of the pipeline's deployments, build number as member and
#: score (newest last), at most LEDGER_MAX of them.
LEDGER_KEY = TEMPLATE_PREFIX + "ledger:{pipeline}"
#: deployment:{pipeline}:{number} -> compact JSON of one deployment (see ledger.Deployment),
#: expiring LEDGER_KEEP after the build started.
DEPLOYMENT_KEY = TEMPLATE_PREFIX + "deployment:{pipeline}:{number}"
#: What DEPLOYMENT_KEY starts with for a pipeline, for the script that trims the ledger.
DEPLOYMENT_PREFIX = TEMPLATE_PREFIX + "deployment:{pipeline}:"
#: Sorted set of the pipelines with deployments, by when one was last recorded (unix seconds).
LEDGER_PIPELINES_KEY = PREFIX + "ledger:pipelines"
#: Hash of pipeline -> JSON of its repository and default branch, as its builds last said.
LEDGER_INFO_KEY = PREFIX + "ledger:info"

#: Sorted set of `pipeline#number` of running deployments no tracker follows (recorded by
#: `ledger rebuild`), by when one replica next asks Buildkite how each ended (or its lease).
#: Kept LEDGER_KEEP after the last one added; each member leaves when its build ends.
LEDGER_FOLLOWUP_KEY = PREFIX + "ledger:followup"

LEDGER_MAX = 200  # deployments kept per pipeline
LEDGER_KEEP = 90 * 24 * 3600  # and for how long after each started
# -- freezes, the stale-block guard, lock hygiene ------------------------------------------

#: freeze:{occurrence}:{edge}:{channel} -> a freeze occurrence's start or end was announced in
#: that channel (SET NX: once across replicas).
FREEZE_ANNOUNCED_KEY = TEMPLATE_PREFIX + "freeze:{occurrence}:{edge}:{channel}"
#: Kept past the announced edge, so that a replica that looks late does not announce it again.
FREEZE_ANNOUNCED_KEEP = 2 * 24 * 3600
#: blocked:{pipeline}:{branch} -> sorted set of the tracked builds of that branch waiting on a
#: block step, by build number.
BLOCKED_KEY = TEMPLATE_PREFIX + "blocked:{pipeline}:{branch}"
#: newest:{pipeline}:{branch} -> JSON of the newest build of that branch that passed or was
#: unblocked (see SupersededBy): older blocked builds are superseded by it.
NEWEST_KEY = TEMPLATE_PREFIX + "newest:{pipeline}:{branch}"
#: superseded:{build_id} -> JSON of the newer build that superseded this blocked one (SET NX:
#: the one process that sets it updates the message, and cancels it when the policy says so).
SUPERSEDED_KEY = TEMPLATE_PREFIX + "superseded:{build_id}"
GUARD_TTL = PENDING_TTL
#: Sorted set of superseded builds whose follow-up (message refresh, and the cancel of
#: `superseded: cancel`) is not known done, by when a sweep may take it over: a process that
#: died between the mark and the cancel leaves its build there.
SUPERSEDED_FOLLOWUP_KEY = PREFIX + "superseded:followup"
#: breakglass:{pipeline}:{requester} -> the id of that person's break-glass approval request
#: on that pipeline, while it may be open: a second one is refused (SET NX).
BREAK_GLASS_KEY = TEMPLATE_PREFIX + "breakglass:{pipeline}:{requester}"
#: lockremind:{pipeline}:{since}:{period} -> the holder of that lock was reminded in that period.
LOCK_REMINDED_KEY = TEMPLATE_PREFIX + "lockremind:{pipeline}:{since}:{period}"
#: Sorted set of the pipelines locked, by when: what the reminder sweep reads, rather than
#: scanning the keyspace every minute. A member whose lock expired is dropped as it is read.
LOCKS_HELD_KEY = PREFIX + "locks:held"
#: Marks that the locks were indexed from the keyspace lately (one SCAN a day across
#: replicas): locks taken by a release before the indexes, or by a process that died between
#: its lock and its index entry, are picked up.
LOCKS_INDEXED_KEY = PREFIX + "locks:indexed"
LOCKS_INDEXED_TTL = 24 * 3600
#: Sorted set of expiring locks (their JSON), by expiry: the channel is told once it passes.
#: No TTL of its own: each member leaves at its expiry (or its unlock), and the set with it.
LOCK_EXPIRY_KEY = PREFIX + "locks:expiring"
# -- agents (MCP) ----------------------------------------------------------------------------

#: agentbudget:{agent}:{kind}:{window} -> what the agent spent of one budget (`mutations` an
#: hour, `reads` a minute) in that window (INCR), shared by every replica.
AGENT_BUDGET_KEY = TEMPLATE_PREFIX + "agentbudget:{agent}:{kind}:{window}"
#: agentcall:{agent}:{key} -> the result (JSON) of an agent's mutation with that identity (its
#: idempotency_key, or one derived from its arguments and the minute); "" while it runs (SET NX).
AGENT_CALL_KEY = TEMPLATE_PREFIX + "agentcall:{agent}:{key}"
#: agentread:{what} -> an answer read from Buildkite for agents, kept a moment (PX).
AGENT_READ_KEY = TEMPLATE_PREFIX + "agentread:{what}"
#: Pub/sub channel beside the events stream: `build:{id}` when a tracked build's phase changed,
#: `approval:{id}` when an approval was settled. Waiting agents wake on it (no Buildkite call).
CHANGES_CHANNEL = PREFIX + "changes"

AGENT_CALL_TTL = REQUEST_TTL  # a retry within a day is the same call
#: A call's "still running" mark outlives any call (waits end within 50 s, Buildkite's answers
#: within its timeouts), so that a call cut off before it could let go frees its key by itself.
AGENT_CALL_RUNNING_TTL = 300
# -- the inbox: thread commands, unfurls, App Home, DMs -------------------------------------

#: event:{event_id} -> an Events API delivery already handled (SET NX): Slack's retries of it
#: (X-Slack-Retry-Num, or Socket Mode's retry_attempt) carry the same event_id and do nothing.
EVENT_KEY = TEMPLATE_PREFIX + "event:{event_id}"
#: Slack retries a delivery three times within minutes; an hour covers them with room to spare.
EVENT_TTL = 3600
#: home:opened:{user} -> when the person last opened the bot's Home tab (unix time). Their Home
#: is republished on a state change only while this key lives.
HOME_OPENED_KEY = TEMPLATE_PREFIX + "home:opened:{user}"
HOME_OPENED_TTL = 7 * 24 * 3600
#: Sorted set of the people who opened their Home (score: when, unix time), pruned past
#: HOME_OPENED_TTL: whose Homes a change to everyone's (a freeze's start or end) republishes.
HOME_WATCHERS_KEY = PREFIX + "home:watchers"
#: home:builds:{user} -> sorted set of the build ids in the person's Home (score: last change).
HOME_BUILDS_KEY = TEMPLATE_PREFIX + "home:builds:{user}"
HOME_BUILDS_KEPT = 20
HOME_BUILDS_TTL = FINAL_TTL
#: home:email:{digest} -> the Slack user with that email (a digest: no address in a key name),
#: learnt from users.info when they open their Home, to find their builds by Buildkite author.
HOME_EMAIL_KEY = TEMPLATE_PREFIX + "home:email:{digest}"
#: home:dirty:{user} -> a build in the person's Home changed since their Home was last published.
HOME_DIRTY_KEY = TEMPLATE_PREFIX + "home:dirty:{user}"
HOME_DIRTY_TTL = HOME_OPENED_TTL
#: home:window:{user} -> a Home was published within the debounce window (SET NX PX): at most
#: one publish per person per window, whichever process makes it.
HOME_WINDOW_KEY = TEMPLATE_PREFIX + "home:window:{user}"
#: prefs:{user} -> JSON of the person's DM preferences (see DmPrefs), kept a year after a change.
PREFS_KEY = TEMPLATE_PREFIX + "prefs:{user}"
PREFS_TTL = 365 * 24 * 3600
#: dm:done:{key} -> a DM about a build was sent (or held for a summary): never again.
DM_DONE_KEY = TEMPLATE_PREFIX + "dm:done:{key}"
DM_DONE_TTL = FINAL_TTL
#: dm:lease:{key} -> the process sending that DM now (SET NX EX), so replicas send it once.
DM_LEASE_KEY = TEMPLATE_PREFIX + "dm:lease:{key}"
DM_LEASE_TTL = 60
#: dm:held:{user} -> hash of the DMs held during the person's quiet hours (DM key -> line).
DM_HELD_KEY = TEMPLATE_PREFIX + "dm:held:{user}"
#: Sorted set of the people with held DMs, by when their quiet hours end (unix time).
DM_DUE_KEY = PREFIX + "dm:due"
DM_HELD_TTL = 2 * 24 * 3600  # quiet hours last less than a day
#: unfurls:{build_id} -> hash of the places a followed build's link was unfurled (field: the
#: message and URL; value: JSON of how chat.unfurl names it, and who shared it), so that its card
#: is unfurled again as the build moves on. It lives as long as a final build's record.
UNFURLS_KEY = TEMPLATE_PREFIX + "unfurls:{build_id}"
UNFURLS_KEPT = 20
UNFURLS_TTL = FINAL_TTL
