"""A transition's Slack writes: each channel's build message brought up to date, its thread reply.

Every post is made at most once in total, whichever process tries (see `_post_once`), and what
was posted is recorded in Redis through a short outage, or it would be posted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from app.slack.directory import Directory
from app.slack.mrkdwn import link
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.render.builds import (
    BlockStep,
    LogTail,
    build_message,
    failing_reply,
    final_reply,
    running_reply,
)
from app.slack.render.common import Rendered
from app.slack.response_urls import SlackHooks
from app.storage.records import MessageTarget, TrackedBuild, Transition
from app.storage.store import Store
from app.tracking.phases import reply_kind
from app.tuning import TrackingTuning
from buildkite.client import BuildkiteClient
from buildkite.errors import BuildkiteError, PermissionDenied
from buildkite.models import Build, BuildState, Job

log = logging.getLogger(__name__)

#: How much of a failed job's log to fetch for the failure reply.
LOG_TAIL_BYTES = 4000


class MessageWriter:
    """Writes what one transition implies to Slack, through the outbox, and marks it posted."""

    def __init__(
        self,
        store: Store,
        buildkite: BuildkiteClient,
        outbox: Outbox,
        hooks: SlackHooks,
        tuning: TrackingTuning,
        *,
        people: Directory | None = None,
    ) -> None:
        self.store = store
        self.buildkite = buildkite
        self.outbox = outbox
        #: The only way to a requester's response_url (see app.slack.response_urls).
        self.hooks = hooks
        self.tuning = tuning
        self.people = people

    async def write(self, tracked: TrackedBuild, transition: Transition) -> Build:
        """Bring every concerned channel's message up to date, and add its thread reply.

        Returns the build as recorded, once every channel has what it should.
        """
        build = Build.model_validate(tracked.snapshot)
        details = _Details(self.buildkite, self.people, tracked, build)
        if transition.new.endswith(":blocked") and transition.new == tracked.phase:
            details.block = await self._block_step(tracked)
        retry_later: SlackDeliveryError | None = None
        for target in tracked.targets:
            if transition.channel not in (None, target.channel):
                continue
            try:
                await self._write_target(tracked, build, target, transition, details)
            except SlackDeliveryError as exc:
                if not exc.permanent:
                    retry_later = retry_later or exc  # the others still get theirs now
        if retry_later is not None:
            raise retry_later
        return build

    async def _write_target(
        self,
        tracked: TrackedBuild,
        build: Build,
        target: MessageTarget,
        transition: Transition,
        details: _Details,
    ) -> None:
        await self._write_root(tracked, build, target, details)
        kind = reply_kind(transition.new)
        if kind is None or transition.gen != tracked.gen or target.ts is None:
            return
        # A running or failing reply already overtaken by a later state stays out of the thread.
        if kind != "final" and transition.new != tracked.phase:
            return
        if await self.store.was_posted(tracked.build_id, target.channel, tracked.gen, kind):
            return
        reply, broadcast = await self._reply(kind, tracked, build, target, details)
        key = f"{tracked.build_id}:{target.channel}:{tracked.gen}:{kind}"
        try:
            await self._post_once(
                key, target.channel, reply, thread_ts=target.reply_thread, broadcast=broadcast
            )
        except SlackDeliveryError as exc:
            if exc.permanent:  # it will never be made: nothing to look for next time
                await self._forget_attempt(key)
            raise
        await self._record(
            lambda: self.store.mark_posted(tracked.build_id, target.channel, tracked.gen, kind)
        )
        await self._forget_attempt(key)

    async def _write_root(
        self, tracked: TrackedBuild, build: Build, target: MessageTarget, details: _Details
    ) -> None:
        """Post the build's message in one channel, or bring it up to date; a deleted one is
        posted again."""
        blocked = tracked.phase.endswith(":blocked")
        root = build_message(
            tracked.pipeline,
            build,
            target.requester,
            block=details.block if blocked else None,
            # A newer build of its branch went further: its Unblock gives way to a note.
            superseded=await self.store.superseded_by(tracked.build_id) if blocked else None,
        )
        digest = root.digest()
        if target.ts is not None and digest != target.rendered:
            try:
                await self.outbox.update(target.channel, target.ts, root)
            except SlackDeliveryError as exc:
                if exc.error != "message_not_found":
                    if not exc.permanent:
                        raise
                    return  # logged by the outbox; the thread reply still goes out
                target.ts = None  # someone deleted it: post it again below
            else:
                target.rendered = digest
                await self.store.save_target(tracked.build_id, target)
        if target.ts is None:
            key = f"{tracked.build_id}:{target.channel}:root"
            try:
                target.ts, earlier = await self._post_once(
                    key, target.channel, root, thread_ts=target.thread_ts
                )
            except SlackDeliveryError as exc:
                if exc.permanent:
                    await self._tell_requester(tracked, target, exc)
                    await self._forget_attempt(key)
                raise
            # A message an earlier attempt posted may show an older state: edited below.
            target.rendered = "" if earlier else digest
            await self._record(lambda: self.store.save_target(tracked.build_id, target))
            await self._forget_attempt(key)
            if earlier:
                try:
                    await self.outbox.update(target.channel, target.ts, root)
                except SlackDeliveryError as exc:
                    if not exc.permanent:
                        raise  # retried later: the record says the message is not up to date
                    return
                target.rendered = digest
                await self.store.save_target(tracked.build_id, target)

    async def _post_once(
        self,
        key: str,
        channel: str,
        rendered: Rendered,
        *,
        thread_ts: str | None,
        broadcast: bool = False,
    ) -> tuple[str, bool]:
        """Post a build's message or reply at most once in total, whichever process tries.

        The attempt is noted in Redis first. If an earlier attempt was noted and never recorded
        as done (its process died between Slack's answer and the record, or Slack's answer was
        lost), the outbox looks for that post in Slack before making it again. Returns the ts,
        and whether an earlier attempt may have made the post (then it may show older content).
        """
        tried_since = await self.store.begin_post(key, time.time())
        ts = await self.outbox.post(
            channel,
            rendered,
            thread_ts=thread_ts,
            reply_broadcast=broadcast,
            key=key,
            tried_since=tried_since,
        )
        return ts, tried_since is not None

    async def _forget_attempt(self, key: str) -> None:
        # Left behind, it costs a look-up if the same post is ever attempted again (it expires).
        with contextlib.suppress(RedisError, OSError):
            await self.store.end_post(key)

    async def _record(self, write: Callable[[], Awaitable[None]]) -> None:
        """Record a Slack post that was made, retrying through a short Redis outage."""
        deadline = time.monotonic() + self.tuning.record_patience
        while True:
            try:
                await write()
                return
            except (RedisError, OSError):
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.25)

    async def _tell_requester(
        self, tracked: TrackedBuild, target: MessageTarget, exc: SlackDeliveryError
    ) -> None:
        """The build's message cannot be posted: say so to whoever asked, with the fix."""
        if not target.notify_url:
            return
        url = tracked.snapshot.get("web_url")
        title = link(str(url) if url else None, f"{tracked.pipeline} #{tracked.number}")
        text = (
            # Follows "Its progress will be posted here": say plainly that it will not be.
            f":warning: Correction: your build {title} was started, but the bot cannot post its "
            f"progress in this channel after all (`{exc.error}`). Invite the bot here "
            "(`/invite @buildkite`) or run the command from a channel it is in."
        )
        # No fallback to the channel: the bot just failed to post there.
        respond = self.hooks.respond(target.notify_url, channel=None, user=target.requester)
        try:
            await respond(text=text, response_type="ephemeral", replace_original=False)
        except Exception as notify_error:  # the build is fine; the hint is best effort
            log.warning("could not tell %s about %s: %s", target.requester, exc, notify_error)

    async def _block_step(self, tracked: TrackedBuild) -> BlockStep | None:
        """The block step a build waits on (its job id and label), from Buildkite."""
        try:
            full = await self.buildkite.get_build(tracked.pipeline, tracked.number)
        except BuildkiteError as exc:
            log.warning(
                "could not read the block step of %s #%s: %s", tracked.pipeline, tracked.number, exc
            )
            return None
        for job in full.jobs:
            if job.type == "manual" and job.state == "blocked":
                return BlockStep(job_id=job.id, label=job.display_name)
        return None

    async def _reply(
        self,
        kind: str,
        tracked: TrackedBuild,
        build: Build,
        target: MessageTarget,
        details: _Details,
    ) -> tuple[Rendered, bool]:
        if kind == "running":
            return running_reply(tracked.pipeline, build), False
        if kind == "failing":
            return failing_reply(tracked.pipeline, build), False
        failed = build.state is BuildState.FAILED
        mention = target.requester
        if mention is None and failed:
            mention = await details.author_mention()
        reply = final_reply(
            tracked.pipeline,
            build,
            mention,
            await details.failed_jobs() if failed else [],
            log_tail=await details.log_tail() if failed else None,
            after_retry=tracked.retried and build.state is BuildState.PASSED,
        )
        # Only a failure of a build someone asked for is also sent to the channel.
        return reply, failed and target.requester is not None


class _Details:
    """What a failure reply needs from Buildkite and Slack, fetched at most once per write."""

    def __init__(
        self,
        buildkite: BuildkiteClient,
        people: Directory | None,
        tracked: TrackedBuild,
        build: Build,
    ) -> None:
        self.buildkite = buildkite
        self.people = people
        self.tracked = tracked
        self.build = build
        self.block: BlockStep | None = None
        self._full: Build | None = None
        self._fetched = False

    async def _full_build(self) -> Build | None:
        if not self._fetched:
            self._fetched = True
            try:
                self._full = await self.buildkite.get_build(
                    self.tracked.pipeline, self.tracked.number
                )
            except BuildkiteError as exc:
                log.warning(
                    "could not list failed jobs of %s #%s: %s",
                    self.tracked.pipeline,
                    self.tracked.number,
                    exc,
                )
        return self._full

    async def failed_jobs(self) -> list[Job]:
        full = await self._full_build()
        return full.failed_jobs if full else []

    async def log_tail(self) -> LogTail | None:
        full = await self._full_build()
        job = full.log_tail_job if full else None
        if job is None:
            return None
        try:
            text = await self.buildkite.job_log_tail(
                self.tracked.pipeline, self.tracked.number, job.id, max_bytes=LOG_TAIL_BYTES
            )
        except PermissionDenied:
            return LogTail(job=job, text=None, missing_scope="read_build_logs")
        except BuildkiteError as exc:
            log.info("no log tail for %s: %s", job.web_url, exc)
            return None
        return LogTail(job=job, text=text)

    async def author_mention(self) -> str | None:
        """The Slack user whose email is the build author's (or creator's), if there is one."""
        directory = self.people
        if directory is None:
            return None
        people = [p for p in (self.build.author, self.build.creator) if p and p.email]
        for person in people:
            assert person.email is not None
            user = await directory.user_for_email(person.email)
            if user:
                return user
        return None
