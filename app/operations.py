"""The mutations people start from Slack (deploy, cancel, rebuild), independent of how they asked.

Each operation claims its request id in Redis first, so a duplicate delivery or a double click
changes nothing at Buildkite, then calls Buildkite once and hands the result to the tracker.
Anything that goes wrong becomes a `UserError` whose text is meant for the person who asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass

import httpx
import redis.asyncio as redis
from redis.exceptions import RedisError

from app.commands import BuildRef, DeployRequest
from app.messages import link
from app.outbox import Outbox
from app.settings import Settings
from app.store import ACTION_TTL, REQUEST_TTL, Store
from app.tracker import Tracker
from buildkite.client import BuildkiteClient
from buildkite.errors import (
    AuthenticationError,
    BuildkiteError,
    BuildkiteUnavailable,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    ValidationFailed,
)
from buildkite.models import Build

log = logging.getLogger(__name__)

TRACKING_DOWN = (
    ":warning: Tracking is unavailable right now (the bot cannot reach its Redis), "
    "so nothing was started. Please try again in a minute."
)


class UserError(Exception):
    """A request that could not be done, with an explanation for the person who asked."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)


@dataclass
class Services:
    """The shared clients and services, created once per process and passed down via context."""

    settings: Settings
    http: httpx.AsyncClient
    redis: redis.Redis
    buildkite: BuildkiteClient
    store: Store
    outbox: Outbox
    tracker: Tracker


def request_id_for(*parts: str) -> str:
    """A short, stable id for a request, derived from what Slack sent."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def explain(exc: BuildkiteError, *, action: str, pipeline: str, number: int | None = None) -> str:
    """A human explanation of a Buildkite failure: which pipeline, which scope, what to do."""
    what = f"`{pipeline}` #{number}" if number is not None else f"`{pipeline}`"
    if isinstance(exc, NotFound):
        if number is not None:
            return f"Build #{number} of pipeline `{pipeline}` was not found."
        return (
            f"Pipeline `{pipeline}` was not found in this Buildkite organisation. "
            "Check the slug in the pipeline's Buildkite URL."
        )
    if isinstance(exc, PermissionDenied):
        if exc.missing_scope:
            return (
                f"Could not {action} {what}: the bot's Buildkite API token lacks the "
                f"`{exc.missing_scope}` scope. An admin can add it to the token in Buildkite's "
                "API Access Tokens settings."
            )
        return f"Could not {action} {what}: Buildkite says the bot's token may not do that (403)."
    if isinstance(exc, AuthenticationError):
        return (
            f"Could not {action} {what}: Buildkite rejected the bot's API token (401). "
            "An admin should check BUILDKITE_API_TOKEN."
        )
    if isinstance(exc, ValidationFailed):
        details = ", ".join(
            f"{e.get('field', '?')} {e.get('code', 'invalid')}" for e in exc.errors if e
        )
        reason = exc.message + (f" ({details})" if details else "")
        return f"Buildkite refused to {action} {what}: {reason}."
    if isinstance(exc, RateLimited):
        wait = f" in about {int(exc.reset)} s" if exc.reset else " in a minute"
        return (
            f"Could not {action} {what}: the Buildkite API rate limit is used up. "
            f"Please try again{wait}."
        )
    if isinstance(exc, ServerError | BuildkiteUnavailable):
        return (
            f"Could not {action} {what}: Buildkite is not answering right now. "
            "Please try again in a minute."
        )
    message = getattr(exc, "message", "") or "an unexpected error"
    return f"Could not {action} {what}: Buildkite answered {message}."


class Operations:
    """Deploy, cancel and rebuild, as requested by a Slack user."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def _claim(self, request_id: str, user_id: str, ttl: int = REQUEST_TTL) -> None:
        """Claim a request, or explain that it (or the same click by someone) is already handled."""
        try:
            first = await self.s.store.claim_request(request_id, user_id, ttl=ttl)
        except RedisError as exc:
            log.warning("redis unavailable while claiming a request: %s", exc)
            raise UserError(TRACKING_DOWN) from None
        if first is None:
            return
        if first == user_id:
            raise UserError(
                ":hourglass_flowing_sand: You already asked for this; it is being handled."
            )
        raise UserError(f":hourglass_flowing_sand: <@{first}> already asked for this a moment ago.")

    async def deploy(
        self, request: DeployRequest, *, user_id: str, user_name: str, channel: str, trigger: str
    ) -> Build:
        """Start a build, once per Slack request."""
        request_id = request_id_for("deploy", trigger)
        await self._claim(request_id, user_id)
        try:
            pipeline = await self.s.buildkite.get_pipeline(request.pipeline)
            branch = request.branch or pipeline.default_branch or "main"
            message = request.message or f"Deployed from Slack by @{user_name}"
            build = await self.s.buildkite.create_build(
                request.pipeline,
                commit=request.commit,
                branch=branch,
                message=message,
                env=request.env or None,
                request_id=request_id,
            )
        except BuildkiteError as exc:
            await self._forget(request_id)
            raise UserError(explain(exc, action="deploy", pipeline=request.pipeline)) from None
        await self._track(build, request.pipeline, channel=channel, requester=user_id)
        return build

    async def cancel(self, ref: BuildRef, *, user_id: str, dedup_key: str) -> Build:
        """Cancel a running build, once per request."""
        await self._claim(dedup_key, user_id, ttl=ACTION_TTL)
        bk = self.s.buildkite
        try:
            try:
                build = await bk.cancel_build(ref.pipeline, ref.number)
            except ValidationFailed:
                current = await bk.get_build(ref.pipeline, ref.number)
                if current.is_final:
                    raise UserError(
                        f"{link(current.web_url, f'{ref.pipeline} #{ref.number}')} already "
                        f"finished ({current.state.value}); there is nothing to cancel."
                    ) from None
                raise
        except BuildkiteError as exc:
            await self._forget(dedup_key)
            raise UserError(
                explain(exc, action="cancel", pipeline=ref.pipeline, number=ref.number)
            ) from None
        await self._observe(build)
        return build

    async def rebuild(self, ref: BuildRef, *, user_id: str, channel: str, dedup_key: str) -> Build:
        """Rebuild a build; the new build is tracked in the original's thread when we know it."""
        await self._claim(dedup_key, user_id, ttl=ACTION_TTL)
        try:
            build = await self.s.buildkite.rebuild_build(ref.pipeline, ref.number)
        except BuildkiteError as exc:
            await self._forget(dedup_key)
            raise UserError(
                explain(exc, action="rebuild", pipeline=ref.pipeline, number=ref.number)
            ) from None
        thread_ts = None
        try:
            original = await self.s.store.find(ref.pipeline, ref.number)
            if original is not None and original.channel == channel:
                thread_ts = original.reply_thread
        except RedisError:
            pass  # _track below reports the outage with the build's link
        await self._track(build, ref.pipeline, channel=channel, requester=user_id, thread=thread_ts)
        return build

    async def _track(
        self,
        build: Build,
        pipeline: str,
        *,
        channel: str,
        requester: str,
        thread: str | None = None,
    ) -> None:
        try:
            await self.s.tracker.track(
                build, pipeline=pipeline, channel=channel, requester=requester, thread_ts=thread
            )
        except RedisError as exc:
            log.error("build %s started but could not be tracked: %s", build.web_url, exc)
            title = link(build.web_url, f"{pipeline} #{build.number}")
            raise UserError(
                f":warning: Your build was started: {title}, but tracking is unavailable right "
                "now (the bot cannot reach its Redis), so its progress will not be posted here. "
                "Follow it in Buildkite."
            ) from None

    async def _observe(self, build: Build) -> None:
        try:
            await self.s.tracker.observe(build)
        except RedisError as exc:
            log.warning("could not record the new state of %s: %s", build.web_url, exc)

    async def _forget(self, request_id: str) -> None:
        # The mutation never happened, so a retry by the user must not be taken for a duplicate.
        with contextlib.suppress(RedisError):
            await self.s.store.release_request(request_id)
