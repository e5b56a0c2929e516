"""Channel notifications: which builds (started anywhere) are announced in which channels.

Routes come from the policy file's `notifications`. A webhook for a matching build starts a
message in the route's channel when the build reaches an event the route announces; from then on
the build is followed like any other (one message per channel, updated in place, with its thread).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from app.core.names import PIPELINE_SLUG
from app.core.policy import NotifyEvent, Policy, Route
from app.storage.store import Store
from app.tracking.intake import Intake
from buildkite.models import Build, BuildState, PipelineRef

log = logging.getLogger(__name__)

#: Told of a final build from a webhook: the build, its pipeline's slug, and the pipeline.
DeployListener = Callable[[Build, str, PipelineRef | None], Awaitable[None]]


def announce(
    route: Route, build: Build, *, previous: str | None, default_branch: str | None
) -> NotifyEvent | None:
    """The event of `route` this build now triggers, if any (`previous`: the branch's last
    final state before this build)."""
    events = set(route.events)
    state = build.state
    if build.is_final:
        if state is BuildState.FAILED:
            if NotifyEvent.FAILED in events:
                return NotifyEvent.FAILED
            if NotifyEvent.FIRST_FAILURE in events and previous == BuildState.PASSED.value:
                return NotifyEvent.FIRST_FAILURE
        if state is BuildState.PASSED:
            if NotifyEvent.PASSED in events:
                return NotifyEvent.PASSED
            if NotifyEvent.FIXED in events and previous == BuildState.FAILED.value:
                return NotifyEvent.FIXED
    elif build.is_waiting_on_block:
        if NotifyEvent.BLOCKED in events:
            return NotifyEvent.BLOCKED
    elif state is BuildState.FAILING and NotifyEvent.FAILED in events:
        return NotifyEvent.FAILED
    elif state in (BuildState.SCHEDULED, BuildState.RUNNING) and NotifyEvent.STARTED in events:
        return NotifyEvent.STARTED
    if (
        NotifyEvent.DEFAULT_BRANCH in events
        and default_branch is not None
        and build.branch == default_branch
    ):
        return NotifyEvent.DEFAULT_BRANCH
    return None


class Router:
    """Feeds webhook builds to the tracker, and starts routed channel messages."""

    def __init__(
        self,
        tracker: Intake,
        store: Store,
        policy: Policy,
        *,
        on_deploy: DeployListener | None = None,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.policy = policy
        #: Told of every final build a webhook brings (the release ledger keeps deployments).
        self.on_deploy = on_deploy

    async def on_build(self, build: Build, pipeline: PipelineRef | None) -> str | None:
        """Observe a build from a webhook; announce it where a route asks for it."""
        changed = await self.tracker.observe(build)
        slug = (pipeline.slug if pipeline else None) or build.pipeline_slug
        if slug is None:
            return changed
        if not PIPELINE_SLUG.match(slug):
            # Not a slug Buildkite makes: nothing to announce, nor to ask Buildkite about.
            log.warning("not announcing build %s: its pipeline slug is not valid", build.id)
            return changed
        if self.on_deploy is not None and build.is_final:
            await self.on_deploy(build, slug, pipeline)
        routes = self.policy.routes_for(slug, build.branch)
        if not routes:
            return changed
        previous = None
        if build.is_final and build.branch:
            previous = await self.store.swap_outcome(slug, build.branch, build.state.value)
        default_branch = pipeline.default_branch if pipeline else None
        for route in routes:
            event = announce(route, build, previous=previous, default_branch=default_branch)
            if event is None:
                continue
            added = await self.tracker.track(
                build, pipeline=slug, channel=route.channel, requester=None, route=route.name
            )
            if added:
                log.info("announcing %s #%s in %s (%s)", slug, build.number, route.channel, event)
        return changed
