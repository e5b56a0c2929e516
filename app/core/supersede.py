"""The stale-block guard: once a newer build of a pipeline's branch passes or is unblocked, the
older builds of that branch still waiting on a block step are superseded. Their message says so
(the notifier re-renders it), unblocking them is refused (or, with `superseded: warn`, needs a
confirmation), and with `superseded: cancel` the bot cancels them, once.

A listener of the notifier's transitions (wired in app.main); what it decides is kept in Redis
(app.storage.guards), so a transition seen twice, or by two replicas, acts once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from app.core.audit import Auditor
from app.core.errors import explain
from app.core.policy import Policy, Superseded
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render import supersede as render
from app.slack.render.common import notice
from app.storage.records import SupersededBy, TrackedBuild, Transition
from app.storage.store import Store
from app.tuning import DEFAULT
from buildkite.client import BuildkiteClient
from buildkite.errors import BuildkiteError, ValidationFailed
from buildkite.models import Build, BuildState

log = logging.getLogger(__name__)

#: How far back Slack is searched for a note an earlier process may have posted (Slack's ts
#: are real time, whatever clock the guard runs on).
RESENT_WITHIN = 6 * 3600

#: The phases a blocked build reaches when someone unblocked it (a cancel is not an unblock).
_GONE_ON = frozenset(
    {
        BuildState.SCHEDULED,
        BuildState.RUNNING,
        BuildState.FAILING,
        BuildState.PASSED,
        BuildState.FAILED,
    }
)


def _blocked(phase: str) -> bool:
    return phase.endswith(":blocked")


class StaleBlocks:
    """Finds the blocked builds a newer build supersedes, and acts on each once."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        buildkite: BuildkiteClient,
        outbox: Outbox,
        auditor: Auditor,
        observe: Callable[[Build], Awaitable[object]],
        *,
        clock: Callable[[], float] = time.time,
        lease: float = DEFAULT.sweeps.superseded_lease,
    ) -> None:
        self.policy = policy
        self.clock = clock
        #: How long the process that marked a build superseded has to follow it up (refresh
        #: its message, cancel it) before a sweep takes that over.
        self.lease = lease
        #: Records the canceled build's new state at once (app.main passes `Intake.observe`).
        self.observe = observe
        self.store = store
        self.buildkite = buildkite
        self.outbox = outbox
        self.auditor = auditor

    async def on_change(self, tracked: TrackedBuild, build: Build, transition: Transition) -> None:
        branch = build.branch
        if transition.old == transition.new:
            return  # the same state again (a job moved): nothing for the guard
        if not branch or transition.new != tracked.phase:
            return  # no branch to compare, or a transition already overtaken
        pipeline = tracked.pipeline
        if _blocked(transition.new):
            await self.store.note_blocked(pipeline, branch, build.number, tracked.build_id)
            newest = await self.store.newest(pipeline, branch)
            if newest is not None and newest.number > build.number:
                await self._supersede(tracked.build_id, newest)
            return
        if _blocked(transition.old):
            await self.store.forget_blocked(pipeline, branch, tracked.build_id)
        passed = transition.new == BuildState.PASSED.value
        unblocked = _blocked(transition.old) and transition.new in _GONE_ON
        if not (passed or unblocked):
            return
        kept = await self.store.raise_newest(
            pipeline, branch, SupersededBy(number=build.number, url=build.web_url)
        )
        for older in await self.store.blocked_before(pipeline, branch, kept.number):
            await self._supersede(older, kept)

    async def _supersede(self, build_id: str, by: SupersededBy) -> None:
        older = await self.store.get(build_id)
        if older is None or not _blocked(older.phase):
            return
        mode = self.policy.rule_for(older.pipeline).superseded
        by = by.model_copy(update={"mode": mode.value})
        lease_until = self.clock() + self.lease
        if not await self.store.supersede(build_id, by, lease_until=lease_until):
            return  # marked already, by this transition seen before or by another replica
        log.info("%s #%s superseded by #%s", older.pipeline, older.number, by.number)
        await self._follow_up(older, by, first=True)

    async def _follow_up(self, older: TrackedBuild, by: SupersededBy, *, first: bool) -> None:
        """What a mark implies: out of the branch's blocked builds, cancelled with `superseded:
        cancel`, and its messages refreshed. Done by the marker (`first`), or, if it died
        before it was done, by a sweep; each step may be done twice without harm."""
        branch = str(older.snapshot.get("branch") or "")
        await self.store.forget_blocked(older.pipeline, branch, older.build_id)
        if by.mode == Superseded.CANCEL.value:
            await self._cancel(older, by, first=first)
        # Its messages show the note instead of the Unblock button.
        current = await self.store.get(older.build_id)
        if current is not None:
            await self.store.queue_refresh(current.build_id, current.phase, current.gen)
        await self.store.superseded_followed_up(older.build_id)

    async def resume(self) -> int:
        """The sweep: follow up the superseded builds whose marker died before it was done
        (between the mark and the cancel, say); returns how many."""
        now = self.clock()
        resumed = 0
        for build_id in await self.store.superseded_followups(now, lease_until=now + self.lease):
            by = await self.store.superseded_by(build_id)
            older = await self.store.get(build_id)
            if by is None or older is None:  # the mark or the build is gone: nothing left to do
                await self.store.superseded_followed_up(build_id)
                continue
            log.info("following up superseded %s #%s", older.pipeline, older.number)
            await self._follow_up(older, by, first=False)
            resumed += 1
        return resumed

    async def _cancel(self, older: TrackedBuild, by: SupersededBy, *, first: bool) -> None:
        if not first:  # a cancel sent before the marker died is not sent again
            try:
                current = await self.buildkite.get_build(older.pipeline, older.number)
            except BuildkiteError as exc:  # the next sweep tries again
                log.warning("superseded %s #%s unread: %s", older.pipeline, older.number, exc)
                raise
            if current.state in (BuildState.CANCELING, BuildState.CANCELED):
                await self.observe(current)
                await self._tell(older, render.superseded_canceled(older.number, by), resent=True)
                return
            if not current.is_waiting_on_block:
                return  # unblocked or finished meanwhile: nothing to cancel
        try:
            canceled = await self.buildkite.cancel_build(older.pipeline, older.number)
        except BuildkiteError as exc:
            # Buildkite cancels only a build still running: one that waits on a block step with
            # nothing else to run counts as finished (422). It stays, its Unblock refused.
            log.warning("could not cancel superseded %s #%s: %s", older.pipeline, older.number, exc)
            await self.store.amend_superseded(
                older.build_id, by.model_copy(update={"mode": Superseded.REFUSE.value})
            )
            await self._record(older, "failed", by, url=None)
            if isinstance(exc, ValidationFailed):
                await self._tell(older, render.superseded_not_canceled(older.number, by))
            else:
                why = explain(exc, action="cancel", pipeline=older.pipeline, number=older.number)
                await self._tell(older, render.superseded_cancel_failed(older.number, by, why))
            return
        await self.observe(canceled)
        await self._record(older, "requested", by, url=canceled.web_url)
        await self._tell(older, render.superseded_canceled(older.number, by))

    async def _record(
        self, older: TrackedBuild, outcome: str, by: SupersededBy, *, url: str | None
    ) -> None:
        await self.auditor.record(
            user="stale-block guard",
            action="cancel",
            pipeline=older.pipeline,
            channel="",
            outcome=outcome,
            number=older.number,
            url=url,
            detail=f"superseded by #{by.number}",
        )

    async def _tell(self, older: TrackedBuild, text: str, *, resent: bool = False) -> None:
        """Say it in the build's threads; `resent` when an earlier process may have said it
        already (Slack is searched for that post first)."""
        since = time.time() - RESENT_WITHIN if resent else None
        for target in older.targets:
            try:
                await self.outbox.post(
                    target.channel,
                    notice(text),
                    thread_ts=target.reply_thread,
                    key=f"{older.build_id}:{target.channel}:superseded",
                    tried_since=since,
                )
            except SlackDeliveryError as exc:
                log.warning("superseded cancel not told in %s: %s", target.channel, exc.error)


async def superseded_refusal(
    store: Store, policy: Policy, pipeline: str, number: int, *, confirmed: bool
) -> tuple[str, SupersededBy] | None:
    """Why build `number` may not be unblocked, superseded as it is, or None: refused, unless
    the policy says `superseded: warn` and the person confirmed (`confirmed`)."""
    tracked = await store.find(pipeline, number)
    by = await store.superseded_by(tracked.build_id) if tracked is not None else None
    if by is None:
        return None
    mode = policy.rule_for(pipeline).superseded
    if mode is Superseded.WARN:
        return None if confirmed else (render.superseded_confirm_first(pipeline, number, by), by)
    return render.superseded_refused(pipeline, number, by), by
