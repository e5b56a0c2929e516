"""Auto-retry: a failed build's jobs are retried when its pipeline's policy opted in.

A listener of the notifier's final transitions; the new attempt is followed through the
`follow` callable given to it (app.main passes `Intake.reopen`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from app.core.audit import Auditor
from app.core.policy import Policy
from app.slack.outbox import Outbox
from app.slack.render import texts
from app.slack.render.builds import retried_reply
from app.slack.render.common import notice
from app.storage.records import TrackedBuild
from app.storage.store import Store
from buildkite.client import BuildkiteClient
from buildkite.errors import BuildkiteError
from buildkite.models import Build, BuildState

log = logging.getLogger(__name__)


class AutoRetry:
    """Retries failed builds' jobs within each rule's attempts and hourly budget."""

    def __init__(
        self,
        policy: Policy,
        store: Store,
        buildkite: BuildkiteClient,
        outbox: Outbox,
        auditor: Auditor,
        follow: Callable[[Build], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.store = store
        self.buildkite = buildkite
        self.outbox = outbox
        self.auditor = auditor
        #: Follows the retried build again, its replies re-armed.
        self.follow = follow
        #: The wall clock of freeze windows (Tuning.clock).
        self.clock = clock

    async def on_final(self, tracked: TrackedBuild, build: Build) -> None:
        """A build ended: retry its failed jobs if it failed and its pipeline opted in."""
        if build.state is BuildState.FAILED:
            await self.retry(tracked, build)

    async def retry(self, tracked: TrackedBuild, build: Build) -> None:
        """Retry a failed build's jobs when its pipeline opted in, within the rule's bounds."""
        rule = self.policy.rule_for(tracked.pipeline).auto_retry
        if rule is None:
            return
        lock = await self.store.pipeline_lock(tracked.pipeline)
        # Who asked, as the bot recorded it: never the build's meta_data, which any of its jobs
        # can set to the lock holder's id (the build passed here carries none today anyway).
        asked_by = {t.requester for t in tracked.targets}
        if lock and lock.user not in asked_by:
            # A freeze stops the bot's own re-runs too, as it stops everybody's Retry clicks.
            for target in tracked.targets:
                await self.outbox.post(
                    target.channel,
                    notice(texts.not_auto_retried_locked(tracked.pipeline, lock.user, lock.reason)),
                    thread_ts=target.reply_thread,
                    key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:locked",
                )
            return
        frozen = self.policy.freeze_refusal(
            tracked.pipeline, self.clock(), action="automatic retry"
        )
        if frozen is not None:  # a freeze window stops them as it stops everybody's retries
            for target in tracked.targets:
                await self.outbox.post(
                    target.channel,
                    notice(frozen),
                    thread_ts=target.reply_thread,
                    key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:frozen",
                )
            return
        attempt = await self.store.count_auto_retry(tracked.build_id)
        if attempt > rule.max_attempts:
            return
        if (
            await self.store.spend_retry_budget(tracked.pipeline, rule.hourly_budget, time.time())
            is None
        ):
            log.info(
                "auto-retry of %s #%s skipped: hourly budget of %d spent",
                tracked.pipeline,
                tracked.number,
                rule.hourly_budget,
            )
            for target in tracked.targets:
                await self.outbox.post(
                    target.channel,
                    notice(texts.not_auto_retried_budget(tracked.pipeline, rule.hourly_budget)),
                    thread_ts=target.reply_thread,
                    key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:budget",
                )
            return
        bk = self.buildkite
        try:
            full = await bk.get_build(tracked.pipeline, tracked.number)
            await bk.retry_failed_jobs(tracked.pipeline, tracked.number)
            fresh = await bk.get_build(tracked.pipeline, tracked.number)
        except BuildkiteError as exc:
            log.warning("auto-retry of %s #%s failed: %s", tracked.pipeline, tracked.number, exc)
            return
        await self.auditor.record(
            user="auto-retry",
            action="retry",
            pipeline=tracked.pipeline,
            channel="",
            outcome="retried",
            number=tracked.number,
            url=build.web_url,
            detail=f"attempt {attempt} of {rule.max_attempts}",
        )
        reply = retried_reply(None, full.failed_jobs, attempt=(attempt, rule.max_attempts))
        for target in tracked.targets:
            await self.outbox.post(
                target.channel,
                reply,
                thread_ts=target.reply_thread,
                key=f"{tracked.build_id}:{target.channel}:{tracked.gen}:autoretry{attempt}",
            )
        await self.follow(fresh)
