"""The one way in: every build seen (our calls' answers, webhooks, polls) goes through `observe`.

Its atomic compare-and-set in Redis lets exactly one observer derive each transition, which the
store queues for the notifier (app.tracking.notifier).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from app.storage.records import MessageTarget, PhaseOutcome
from app.storage.store import Store
from app.tracking.phases import FINAL_PHASES, phase_of, rank_of, snapshot
from buildkite.client import BuildkiteClient
from buildkite.errors import BuildkiteError
from buildkite.models import Build

log = logging.getLogger(__name__)


class Intake:
    """Follows the builds the bot started: records each change of state once, whoever sees it."""

    def __init__(
        self,
        store: Store,
        buildkite: BuildkiteClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.clock = clock

    async def track(
        self,
        build: Build,
        *,
        pipeline: str,
        channel: str,
        requester: str | None,
        thread_ts: str | None = None,
        notify_url: str | None = None,
        route: str | None = None,
    ) -> bool:
        """Follow a build with a message in `channel` (posted by the notifier).

        False when that channel already has a message about the build: never two per channel.
        """
        phase, rank = phase_of(build)
        target = MessageTarget(
            channel=channel,
            requester=requester,
            thread_ts=thread_ts,
            notify_url=notify_url,
            route=route,
        )
        return await self.store.track(
            build.id,
            pipeline=pipeline,
            number=build.number,
            target=target,
            phase=phase,
            rank=rank,
            snapshot=snapshot(build),
            final=build.is_final,
        )

    async def reopen(self, build: Build) -> None:
        """The bot retried this finished build's jobs: follow it again, replies re-armed."""
        await self.store.mark_retried(build.id)
        await self.store.reset(build.id, new_generation=True)
        await self.observe(build, confirmed=True)

    async def observe(self, build: Build, *, confirmed: bool = False) -> str | None:
        """Feed a build seen anywhere; returns the previous phase if this call changed it.

        A build that seems to have gone back (it left a block step, or a finished build's jobs
        were retried) is checked against Buildkite once before its message follows it back, so
        a late, out-of-order webhook cannot undo a newer state.
        """
        phase, rank = phase_of(build)
        result = await self.store.observe(
            build.id,
            phase=phase,
            rank=rank,
            snapshot=snapshot(build),
            final=build.is_final,
            blocked=build.is_waiting_on_block and not build.is_final,
            now=self.clock(),
        )
        if result.outcome is PhaseOutcome.CHANGED:
            return result.previous
        if result.outcome is PhaseOutcome.UNCHANGED:
            return None
        if confirmed:
            return None
        tracked = await self.store.get(build.id)
        if tracked is None:
            return None
        try:
            fresh = await self.buildkite.get_build(tracked.pipeline, tracked.number)
        except BuildkiteError as exc:
            log.warning("could not confirm %s #%s: %s", tracked.pipeline, tracked.number, exc)
            return None
        fresh_phase, fresh_rank = phase_of(fresh)
        if fresh_phase == tracked.phase or fresh_rank >= rank_of(tracked):
            return await self.observe(fresh, confirmed=True)
        was_final = tracked.phase in FINAL_PHASES
        await self.store.reset(build.id, new_generation=was_final)
        return await self.observe(fresh, confirmed=True)
