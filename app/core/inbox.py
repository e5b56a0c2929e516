"""A person's own view of the bot: whose builds are whose (started through the bot, or credited
by Buildkite to their email), and their App Home, built from Redis and republished when one of
its builds changes (at most once per person per debounce window, across replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from redis.exceptions import RedisError
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from app.core.approvals import Approvals
from app.core.build_actions import BuildActions
from app.core.commands import BuildRef, UnlockRequest
from app.core.deploys import NeedsConfirmation, plan_from
from app.core.errors import UserError, explain
from app.core.freezes import current_and_upcoming, view_of
from app.core.listings import Listings
from app.core.locks import Locks
from app.core.policy import Action, Policy, is_agent
from app.core.services import Services
from app.settings import Settings
from app.slack.actor import Actor
from app.slack.directory import Directory
from app.slack.ids import ActionId
from app.slack.outbox import Outbox, SlackDeliveryError
from app.slack.payloads import UnblockButtonValue, UnblockMetadata
from app.slack.render import answers, home_texts, texts
from app.slack.render.common import Rendered
from app.slack.render.dms import final_dm, final_line, summary_dm
from app.slack.render.home import NO_QUIET, HomeApproval, HomeBuild, HomeContent, home_view
from app.slack.render.texts import TRACKING_DOWN
from app.slack.render.unblock import unblock_freeform_modal, unblock_modal
from app.storage.inbox import DmMode, DmPrefs
from app.storage.keys import HOME_BUILDS_KEPT
from app.storage.records import (
    ApprovalStatus,
    MessageTarget,
    PipelineLock,
    TrackedBuild,
    Transition,
)
from app.storage.store import Store
from app.tuning import InboxTuning
from buildkite.errors import BuildkiteError
from buildkite.models import Build, BuildState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Person:
    """What users.info says of a person that the inbox needs."""

    email: str | None
    timezone: str | None


def home_channel(tracked: TrackedBuild, user: str) -> MessageTarget | None:
    """The build message a person's Home click acts as if clicked on: theirs, else the first."""
    mine = next((t for t in tracked.targets if t.requester == user), None)
    return mine or (tracked.targets[0] if tracked.targets else None)


class Inbox:
    """Whose builds are whose, and each person's Home tab."""

    def __init__(
        self,
        *,
        store: Store,
        outbox: Outbox,
        policy: Policy,
        directory: Directory,
        settings: Settings,
        tuning: InboxTuning,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.policy = policy
        self.directory = directory
        self.settings = settings
        self.tuning = tuning
        self.clock = clock
        self.sleep = sleep
        self._people: dict[str, tuple[float, Person]] = {}
        self._republishing: dict[str, asyncio.Task[None]] = {}
        #: Everyone's locks, read (a SCAN) once for a burst of republishes, not once per Home.
        self._locks: tuple[float, list[PipelineLock]] | None = None

    @property
    def client(self) -> AsyncWebClient:
        return self.outbox.client

    async def person(self, user: str) -> Person:
        """The person's email and timezone (users.info), kept in memory for a while."""
        cached = self._people.get(user)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            response = await self.client.users_info(user=user)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("users.info for %s failed: %s", user, type(exc).__name__)
            return Person(email=None, timezone=None)
        info = response.get("user") or {}
        email = (info.get("profile") or {}).get("email")
        found = Person(
            email=str(email) if email else None,
            timezone=str(info["tz"]) if info.get("tz") else None,
        )
        self._people[user] = (time.monotonic() + self.tuning.people_ttl, found)
        return found

    # -- whose builds ---------------------------------------------------------------------

    async def people_of(self, tracked: TrackedBuild, build: Build) -> list[str]:
        """Who a build belongs to: whoever started it through the bot, and the person whose
        email Buildkite credits it to (known once they have opened their Home). An agent's
        build belongs to the person it acts for, if any: an agent has no Home."""
        people = self.people_for(t.requester for t in tracked.targets if t.requester)
        author = build.author.email if build.author and build.author.email else None
        if author:
            by_email = await self.store.user_with_email(author)
            if by_email:
                people.append(by_email)
        return list(dict.fromkeys(people))

    def people_for(self, requesters: Iterable[str]) -> list[str]:
        """The Slack people behind requesters: a person as is, an agent (`agent:<name>`) as the
        person it acts for, or nobody (Slack knows no such user to look up or DM)."""
        people = []
        for requester in requesters:
            if is_agent(requester):
                person = self.policy.acts_for(requester)
                if person:
                    people.append(person)
            else:
                people.append(requester)
        return people

    async def on_change(
        self, tracked: TrackedBuild, build: Build, transition: Transition | None = None
    ) -> None:
        """A build changed state: it goes to the top of its people's Homes, and the Homes of
        those who opened theirs lately are republished (debounced)."""
        people = await self.people_of(tracked, build)
        if not people:
            return
        await self.store.remember_home_builds(people, tracked.build_id, self.clock())
        watching = await self.store.watching_home(people)
        await self.store.mark_home_dirty(watching)
        for user in watching:
            self._republish_soon(user)

    async def everyone_changed(self) -> int:
        """Something every Home shows changed (a freeze started or ended): republish the Homes
        of all who opened theirs in the last 7 days, debounced as for a build's change.
        Returns how many."""
        watching = await self.store.home_watchers(self.clock())
        await self.store.mark_home_dirty(watching)
        for user in watching:
            self._republish_soon(user)
        return len(watching)

    # -- the Home tab ---------------------------------------------------------------------

    async def opened(self, user: str) -> None:
        """The person opened their Home: publish it now, and keep it fresh for 7 days."""
        person = await self.person(user)
        await self.store.home_opened(user, email=person.email, now=self.clock())
        await self.store.open_home_window(user, self._window_ms)
        await self.store.take_home_dirty(user)
        await self.publish(user)

    async def publish(self, user: str, *, fresh: bool = True) -> None:
        """Publish the person's Home; `fresh=False` (a republish after a build's change) may
        show locks read up to a second ago, shared with the other Homes of the same change."""
        await self.outbox.publish_home(user, home_view(await self.content(user, fresh=fresh)))

    async def _all_locks(self, *, fresh: bool) -> list[PipelineLock]:
        now = time.monotonic()
        if fresh or self._locks is None or self._locks[0] < now:
            self._locks = (now + 1.0, await self.store.every_pipeline_lock())
        return self._locks[1]

    async def content(self, user: str, *, fresh: bool = True) -> HomeContent:
        person = await self.person(user)
        locks = await self._all_locks(fresh=fresh)
        active, coming = current_and_upcoming(self.policy.data.freezes, self.clock())
        return HomeContent(
            user=user,
            builds=await self._builds(user),
            approvals=await self._approvals(user),
            locks=[lock for lock in locks if lock.user == user],
            freezes=[view_of(o) for o in active],
            coming_freezes=[view_of(o) for o in coming],
            prefs=await self.store.dm_prefs(user),
            timezone=person.timezone,
        )

    async def _builds(self, user: str) -> list[HomeBuild]:
        found = []
        for build_id in await self.store.home_build_ids(user, self.tuning.home_builds):
            tracked = await self.store.get(build_id)
            if tracked is None or not tracked.snapshot:
                continue
            try:
                build = Build.model_validate(tracked.snapshot)
            except ValueError:
                continue
            buttons = await self.home_buttons(tracked, build, user)
            found.append(HomeBuild(pipeline=tracked.pipeline, build=build, buttons=buttons))
        return found

    async def home_buttons(
        self, tracked: TrackedBuild, build: Build, user: str
    ) -> tuple[ActionId, ...]:
        """The buttons the policy allows the person on this build, in its present state, as if
        clicked on its build message (a protected rebuild asks first: from the message only)."""
        target = home_channel(tracked, user)
        if target is None:
            return ()
        wanted: list[tuple[ActionId, Action]] = []
        if build.is_waiting_on_block and not build.is_final:
            wanted.append((ActionId.HOME_UNBLOCK, Action.UNBLOCK))
        if not build.is_final and build.state is not BuildState.CANCELING:
            wanted.append((ActionId.HOME_CANCEL, Action.CANCEL))
        rule = self.policy.rule_for(tracked.pipeline)
        if build.is_final and not rule.asks_first:
            wanted.append((ActionId.HOME_REBUILD, Action.REBUILD))
        if build.state is BuildState.FAILED:
            wanted.append((ActionId.HOME_RETRY, Action.REBUILD))
        allowed = []
        for button, action in wanted:
            decision = await self.policy.check(
                action,
                tracked.pipeline,
                user=user,
                channel_id=target.channel,
                channel_name=None,
                resolve=self.directory.usergroup_members,
            )
            if decision.allowed:
                allowed.append(button)
        return tuple(allowed)

    async def _approvals(self, user: str) -> list[HomeApproval]:
        found = []
        for approval_id in await self.store.pending_approval_ids(self.clock()):
            approval = await self.store.approval(approval_id)
            if approval is None or approval.status is not ApprovalStatus.PENDING:
                continue
            plan = plan_from(approval.request)
            rule = self.policy.rule_for(plan.pipeline)
            approvers = rule.approval.approvers if rule.approval else []
            if user == plan.requester or user not in await self.policy.members(
                approvers, self.directory.usergroup_members
            ):
                continue
            found.append(HomeApproval(approval_id=approval_id, plan=plan))
        return found

    # -- republishing, debounced ----------------------------------------------------------

    @property
    def _window_ms(self) -> int:
        return int(self.tuning.home_debounce * 1000)

    def _republish_soon(self, user: str) -> None:
        running = self._republishing.get(user)
        if running is not None and not running.done():
            return  # it looks at the person's "changed" mark again before it ends
        task = asyncio.create_task(self._republish(user), name=f"home:{user}")
        self._republishing[user] = task
        task.add_done_callback(functools.partial(self._republished, user))

    def _republished(self, user: str, task: asyncio.Task[None]) -> None:
        if self._republishing.get(user) is task:
            del self._republishing[user]

    async def _republish(self, user: str) -> None:
        """Publish while the person's Home is marked changed, at most once per window: the first
        change is shown at once, a burst within the window once at its end. Whichever process
        claims the window publishes; the others wait for it to close and look again."""
        try:
            while await self.store.home_dirty(user):
                if await self.store.open_home_window(user, self._window_ms):
                    if await self.store.take_home_dirty(user):
                        await self.publish(user, fresh=False)
                    continue
                left = await self.store.home_window_left_ms(user)
                await self.sleep(max(left, 10) / 1000)
        except (RedisError, OSError, SlackDeliveryError) as exc:
            log.warning("could not republish the Home of %s: %s", user, exc)

    async def close(self) -> None:
        """Stop the republishing still waiting (their marks stay in Redis)."""
        tasks = list(self._republishing.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def settled(self) -> None:
        """Wait for the republishing under way (tests; a shutdown cancels them instead)."""
        while self._republishing:
            await asyncio.gather(*self._republishing.values(), return_exceptions=True)


@dataclass(frozen=True)
class Done:
    """A Home click that did what it asked: `text` to show the person."""

    text: str


@dataclass(frozen=True)
class OpenForm:
    """A Home click that needs a form first (an unblock step with fields)."""

    view: dict[str, Any]


class HomeActions:
    """What a person's Home buttons do: the operations their build message's buttons call, as
    if clicked on that message (its channel's policy rules, its thread for the replies)."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.ops = BuildActions(services)

    async def _on_message(self, ref: BuildRef, user: Mapping[str, Any]) -> tuple[Actor, str | None]:
        try:
            tracked = await self.s.store.find(ref.pipeline, ref.number)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        target = home_channel(tracked, str(user["id"])) if tracked is not None else None
        if tracked is None or target is None:
            raise UserError(home_texts.build_gone(ref.pipeline, ref.number))
        if not await self._in_home(tracked, str(user["id"])):
            # A value the Home never showed this person (forged, or another person's Home): the
            # build's message is where others act on it, among the people of its channel.
            raise UserError(home_texts.not_yours(ref.pipeline, ref.number))
        return Actor.from_user(user, target.channel), target.reply_thread

    async def _in_home(self, tracked: TrackedBuild, user: str) -> bool:
        if any(t.requester == user for t in tracked.targets):
            return True
        try:
            return tracked.build_id in await self.s.store.home_build_ids(user, HOME_BUILDS_KEPT)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None

    async def cancel(self, ref: BuildRef, user: Mapping[str, Any]) -> Done:
        actor, _ = await self._on_message(ref, user)
        key = f"button:{ActionId.CANCEL}:{ref.pipeline}:{ref.number}"
        build = await self.ops.cancel(ref, actor, dedup_key=key)
        return Done(home_texts.cancel_requested(ref.pipeline, build))

    async def rebuild(self, ref: BuildRef, user: Mapping[str, Any], *, trigger: str) -> Done:
        actor, _ = await self._on_message(ref, user)
        if self.s.policy.rule_for(ref.pipeline).asks_first:
            raise UserError(home_texts.PROTECTED_REBUILD)
        key = f"button:{ActionId.REBUILD}:{ref.pipeline}:{ref.number}"
        outcome = await self.ops.rebuild(ref, actor, dedup_key=key, trigger=trigger)
        if isinstance(outcome, NeedsConfirmation):  # the rule changed since the Home was drawn
            raise UserError(home_texts.PROTECTED_REBUILD)
        return Done(home_texts.rebuild_started(ref.pipeline, outcome.build))

    async def retry(self, ref: BuildRef, user: Mapping[str, Any]) -> Done:
        actor, thread = await self._on_message(ref, user)
        key = f"button:{ActionId.RETRY_FAILED}:{ref.pipeline}:{ref.number}"
        jobs = await self.ops.retry_failed(
            ref, actor, thread=(actor.channel_id, thread), dedup_key=key
        )
        return Done(answers.retrying((j.web_url, j.display_name) for j in jobs))

    async def unblock(self, ref: BuildRef, user: Mapping[str, Any]) -> Done | OpenForm:
        """Unblock the step the build waits on, or open its form when it asks for input."""
        actor, thread = await self._on_message(ref, user)
        build = await Listings(self.s).build(ref, action="unblock")
        job = next((j for j in build.jobs if j.type == "manual" and j.state == "blocked"), None)
        if job is None:
            raise UserError(texts.STEP_GONE)
        value = UnblockButtonValue(pipeline=ref.pipeline, number=ref.number, job=job.id)
        target = await self.ops.unblock_form(value, actor)
        if target.form is None or target.form.fields:
            metadata = UnblockMetadata(
                pipeline=ref.pipeline,
                number=ref.number,
                job=job.id,
                channel=actor.channel_id,
                thread_ts=thread,
                label=target.label[:200],
            )
            view = (
                unblock_modal(target.label, target.form, metadata)
                if target.form is not None
                else unblock_freeform_modal(
                    target.label, target.build_url, target.problem, metadata
                )
            )
            return OpenForm(view)
        key = f"unblock:{ref.pipeline}:{ref.number}:{job.id}"
        try:
            await self.ops.unblock(
                value,
                actor,
                label=target.label,
                fields={},
                thread=(actor.channel_id, thread),
                dedup_key=key,
            )
        except BuildkiteError as exc:
            raise UserError(
                explain(exc, action="unblock", pipeline=ref.pipeline, number=ref.number)
            ) from None
        return Done(answers.unblocked(target.label))

    async def decide(self, approval_id: str, user: Mapping[str, Any], *, approve: bool) -> Done:
        try:
            approval = await self.s.store.approval(approval_id)
        except RedisError:
            raise UserError(TRACKING_DOWN) from None
        if approval is None:
            raise UserError(texts.APPROVAL_GONE)
        actor = Actor.from_user(user, approval.channel)
        build = await Approvals(self.s).decide(approval_id, actor, approve=approve)
        if build is None:
            return Done(answers.REJECTED)
        return Done(answers.approved(build.web_url, build.pipeline_slug, build.number))

    async def unlock(self, pipeline: str, user: Mapping[str, Any]) -> Done:
        actor = Actor.from_user(user, "")
        return Done(await Locks(self.s).unlock(UnlockRequest(pipeline), actor))

    async def set_dm_mode(self, user: str, mode: str) -> None:
        try:
            chosen = DmMode(mode)
        except ValueError:
            raise UserError(home_texts.STALE_CHOICE) from None
        prefs = await self.s.store.dm_prefs(user)
        await self.s.store.save_dm_prefs(user, prefs.model_copy(update={"mode": chosen}))

    async def set_quiet_hour(self, user: str, *, start: bool, hour: str) -> None:
        """Set the start or the end of the person's quiet hours ("none" clears both)."""
        prefs = await self.s.store.dm_prefs(user)
        if hour == NO_QUIET:
            update: dict[str, int | None] = {"quiet_from": None, "quiet_to": None}
        elif hour.isascii() and hour.isdigit() and len(hour) <= 2 and int(hour) <= 23:
            # isascii: "²" is a digit to str.isdigit() that int() refuses.
            other = prefs.quiet_to if start else prefs.quiet_from
            default_other = (int(hour) + 8) % 24 if start else (int(hour) + 16) % 24
            paired = other if other is not None else default_other
            update = (
                {"quiet_from": int(hour), "quiet_to": paired}
                if start
                else {"quiet_from": paired, "quiet_to": int(hour)}
            )
        else:
            raise UserError(home_texts.STALE_CHOICE)
        await self.s.store.save_dm_prefs(
            user, DmPrefs.model_validate({**prefs.model_dump(), **update})
        )


def quiet_until(prefs: DmPrefs, timezone: str | None, now: float) -> float | None:
    """When the person's quiet hours end, if `now` is within them (in their timezone)."""
    start, end = prefs.quiet_from, prefs.quiet_to
    if start is None or end is None or start == end:
        return None
    try:
        zone: tzinfo = ZoneInfo(timezone) if timezone else UTC
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # users.info is read generously: "America" is a directory of tzdata (IsADirectoryError),
        # a very long name too long a file name (OSError); such a timezone counts as UTC.
        zone = UTC
    local = datetime.fromtimestamp(now, zone)
    hour = local.hour
    quiet = start <= hour < end if start < end else (hour >= start or hour < end)
    if not quiet:
        return None
    ends = local.replace(hour=end, minute=0, second=0, microsecond=0)
    if ends <= local:
        ends += timedelta(days=1)
    return ends.timestamp()


class DirectMessages:
    """DMs about a person's own finished builds, as their preferences say, exactly once."""

    def __init__(
        self,
        *,
        store: Store,
        outbox: Outbox,
        directory: Directory,
        inbox: Inbox,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.directory = directory
        self.inbox = inbox
        self.clock = clock

    async def recipients(self, tracked: TrackedBuild, build: Build) -> list[str]:
        """Whoever deployed it through the bot; else the author, when their email is a Slack
        user's. An agent's build goes to the person it acts for, if any."""
        people = self.inbox.people_for(t.requester for t in tracked.targets if t.requester)
        if not people and build.author and build.author.email:
            user = await self.directory.user_for_email(build.author.email)
            if user:
                people.append(user)
        return list(dict.fromkeys(people))

    async def on_change(
        self, tracked: TrackedBuild, build: Build, transition: Transition | None = None
    ) -> None:
        """A build changed state: when it is final, tell its people (a change told again after a
        crash finds its DM already sent, or looks for it in the DM before sending)."""
        if not build.is_final:
            return
        line = final_line(tracked.pipeline, build)
        people = await self.recipients(tracked, build)
        # A build followed by many people: their DMs go a few at a time, not one by one.
        slots = asyncio.Semaphore(8)

        async def tell(user: str) -> None:
            async with slots:
                await self._tell(user, tracked, build, line)

        results = await asyncio.gather(*(tell(u) for u in people), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        # A failure worth trying again goes first: the notifier gives up on a permanent one, and
        # would then never send the DMs that failed only for now (those sent are not sent again).
        retried = [r for r in failed if not (isinstance(r, SlackDeliveryError) and r.permanent)]
        if retried or failed:
            raise (retried or failed)[0]

    async def _tell(self, user: str, tracked: TrackedBuild, build: Build, line: str) -> None:
        prefs = await self.store.dm_prefs(user)
        if prefs.mode is DmMode.OFF:
            return
        if prefs.mode is DmMode.FAILURES and build.state is not BuildState.FAILED:
            return
        key = f"dm:{tracked.build_id}:{tracked.gen}:{user}"
        if await self.store.dm_done(key):
            return
        now = self.clock()
        person = await self.inbox.person(user)
        until = quiet_until(prefs, person.timezone, now)
        if until is not None:
            await self.store.hold_dm(user, key, line, until=until, now=now)
            return
        await self.send(user, final_dm(line), key=key)

    async def send(
        self, user: str, rendered: Rendered, *, key: str, exclusive: bool = False
    ) -> None:
        """Post one DM at most once: looked for in the DM first if an earlier attempt may have
        reached Slack (a process killed meanwhile), and marked as sent.

        A build's DMs are sent under the build's own lock (the notifier's), so no other process
        sends them meanwhile; `exclusive` claims the key for a minute first, for the summaries,
        which any replica's sweep may find due.
        """
        if exclusive and not await self.store.claim_dm(key):
            return  # another process is sending it
        try:
            if await self.store.dm_done(key):
                return
            channel = await self.outbox.open_dm(user)
            tried_since = await self.store.begin_post(key, time.time())
            await self.outbox.post(channel, rendered, key=key, tried_since=tried_since)
            await self.store.mark_dm_done(key)
            await self.store.end_post(key)
        finally:
            if exclusive:
                await self.store.release_dm(key)

    async def send_due_summaries(self) -> int:
        """Send each summary whose quiet hours ended; returns how many were sent."""
        sent = 0
        for user, due in await self.store.due_summaries(self.clock()):
            held = await self.store.held_dms(user)
            fields, lines = [f for f, _ in held], [line for _, line in held]
            # Named by its oldest DM too: those held while it was sent get a summary of their own.
            oldest = hashlib.sha256(fields[0].encode()).hexdigest()[:12] if fields else "-"
            key = f"dm-summary:{user}:{int(due)}:{oldest}"
            prefs = await self.store.dm_prefs(user)
            if lines and prefs.mode is not DmMode.OFF and not await self.store.dm_done(key):
                try:
                    await self.send(user, summary_dm(lines), key=key, exclusive=True)
                except SlackDeliveryError as exc:
                    if not exc.permanent:
                        continue  # kept for the next sweep; the others' summaries still go
                    # A person Slack will never let the bot DM (deactivated, a bot, DMs off):
                    # their summary is dropped rather than tried on every sweep forever.
                    log.warning("dropped the quiet-hours summary of %s: %s", user, exc.error)
                    await self.store.clear_held_dms(user, fields)
                    continue
                if not await self.store.dm_done(key):
                    continue  # another process is sending it: it clears them
                sent += 1
            await self.store.clear_held_dms(user, fields)
        return sent

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        """Send the summaries due, every `interval` seconds, until `stop` is set."""
        while not stop.is_set():
            try:
                await self.send_due_summaries()
            except (RedisError, OSError, SlackApiError, SlackDeliveryError) as exc:
                log.warning("the quiet-hours summaries failed; retrying: %s", exc)
            except Exception:
                log.exception("the quiet-hours summaries failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
