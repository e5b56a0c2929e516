"""Commands typed to the bot in a build's thread (`@bot status|cancel|rebuild|retry|unblock|help`):
which build the thread is about, and the same operations the build's buttons call, with the same
policy, lock and de-duplication checks."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
from redis.exceptions import RedisError
from slack_sdk.errors import SlackApiError

from app.core.build_actions import BuildActions
from app.core.commands import BuildRef
from app.core.deploys import NeedsConfirmation
from app.core.errors import UserError
from app.core.listings import Listings
from app.core.names import is_pipeline_slug
from app.core.services import Services
from app.slack.actor import Actor
from app.slack.ids import ActionId
from app.slack.payloads import UnblockButtonValue
from app.slack.render import threads
from app.slack.render.common import Rendered
from app.slack.render.texts import TRACKING_DOWN
from app.slack.render.unfurl import build_card
from buildkite.models import Build

log = logging.getLogger(__name__)

#: A build's page on Buildkite, anywhere in a text (the organisation is checked after).
BUILD_LINK = re.compile(
    r"https?://buildkite\.com/(?P<org>[A-Za-z0-9][A-Za-z0-9_-]{0,99})/(?P<pipeline>[^/\s#?|>]+)"
    r"/builds/(?P<number>[0-9]{1,9})(?![0-9])"
)
#: A Slack user mention in an event's text: `<@U123>` or `<@U123|name>`.
_USER_MENTION = re.compile(r"<@[A-Z0-9]+(?:\|[^>]*)?>")
#: At most this many build links of one message are considered.
MAX_LINKS = 5


class ThreadCommand(StrEnum):
    STATUS = "status"
    CANCEL = "cancel"
    REBUILD = "rebuild"
    RETRY = "retry"
    UNBLOCK = "unblock"
    HELP = "help"


@dataclass(frozen=True)
class Mention:
    """An `app_mention` event: who wrote what, where, and the delivery's id."""

    event_id: str
    user: str
    channel: str
    ts: str
    thread_ts: str | None
    text: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Mention | None:
        """The mention in an Events API body, or None when it is not one a person wrote."""
        event = body.get("event")
        if not isinstance(event, dict):
            return None
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        event_id = body.get("event_id")
        if event.get("bot_id") or event.get("subtype"):
            return None  # a bot's message or an edit: never a command
        if not all(isinstance(v, str) and v for v in (user, channel, ts, event_id)):
            return None
        thread_ts = event.get("thread_ts")
        return cls(
            event_id=str(event_id),
            user=str(user),
            channel=str(channel),
            ts=str(ts),
            thread_ts=str(thread_ts) if isinstance(thread_ts, str) and thread_ts else None,
            text=str(event.get("text") or "")[:4000],
        )

    @property
    def actor(self) -> Actor:
        # An event names no channel: policy rules naming channels by `#name` refuse it (see
        # docs/inbox.md); rules naming them by id apply as for a click.
        return Actor(user_id=self.user, user_name=self.user, channel_id=self.channel)


def parse_command(text: str) -> tuple[ThreadCommand | None, str]:
    """The command of a mention's text (the mentions themselves left out), and its first word.

    An empty text is a request for help; an unknown word gives None and the word.
    """
    words = _USER_MENTION.sub(" ", text).split()
    if not words:
        return ThreadCommand.HELP, ""
    word = words[0].lower().strip(".,!?:")
    try:
        return ThreadCommand(word), word
    except ValueError:
        return None, words[0][:40]


def build_links(texts: Iterator[str], org: str) -> list[BuildRef]:
    """The builds of `org` linked in these texts, first seen first, each once."""
    found: list[BuildRef] = []
    for text in texts:
        for match in BUILD_LINK.finditer(text):
            pipeline = match.group("pipeline")
            if match.group("org") != org or not is_pipeline_slug(pipeline):
                continue
            ref = BuildRef(pipeline, int(match.group("number")))
            if ref.number > 0 and ref not in found:
                found.append(ref)
            if len(found) >= MAX_LINKS:
                return found
    return found


def message_texts(message: Any, depth: int = 0) -> Iterator[str]:
    """Every string in a message (its text, blocks and attachments), where links may hide."""
    if depth > 12:
        return
    if isinstance(message, str):
        yield message
    elif isinstance(message, dict):
        for key, value in message.items():
            if key not in ("metadata", "bot_profile", "user_profile"):
                yield from message_texts(value, depth + 1)
    elif isinstance(message, list):
        for value in message[:100]:
            yield from message_texts(value, depth + 1)


@dataclass(frozen=True)
class InThread:
    """Post this in the build's thread (keyed by the mention, so it shows once)."""

    rendered: Rendered


@dataclass(frozen=True)
class Privately:
    """Show this to the person only (a confirmation to click, or an Unblock form to open)."""

    rendered: Rendered


@dataclass(frozen=True)
class AlreadyShown:
    """The operation itself posted its reply in the thread (a retry, an unblock)."""


Outcome = InThread | Privately | AlreadyShown


class ThreadCommands:
    """Runs a mention's command on the build whose thread it was written in."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.ops = BuildActions(services)

    async def run(self, mention: Mention) -> Outcome:
        """Raises UserError for a refusal (said to the person only)."""
        command, word = parse_command(mention.text)
        ref = await self.build_of_thread(mention.channel, mention.thread_ts)
        if command is None:
            raise UserError(threads.unknown_command(word, in_build_thread=ref is not None))
        if ref is None or command is ThreadCommand.HELP:
            return InThread(threads.help_text((ref.pipeline, ref.number) if ref else None))
        actor = mention.actor
        if command is ThreadCommand.STATUS:
            return InThread(await self._status(ref))
        if command is ThreadCommand.CANCEL:
            key = f"button:{ActionId.CANCEL}:{ref.pipeline}:{ref.number}"
            build = await self.ops.cancel(ref, actor, dedup_key=key)
            return InThread(threads.cancel_requested(mention.user, build, ref.pipeline))
        if command is ThreadCommand.REBUILD:
            key = f"button:{ActionId.REBUILD}:{ref.pipeline}:{ref.number}"
            outcome = await self.ops.rebuild(
                ref, actor, dedup_key=key, trigger=f"mention:{mention.event_id}"
            )
            if isinstance(outcome, NeedsConfirmation):
                return Privately(outcome.rendered)
            return InThread(
                threads.rebuild_started(mention.user, outcome.build, (ref.pipeline, ref.number))
            )
        if command is ThreadCommand.RETRY:
            await self.ops.retry_failed(
                ref,
                actor,
                thread=(mention.channel, mention.thread_ts),
                dedup_key=f"button:{ActionId.RETRY_FAILED}:{ref.pipeline}:{ref.number}",
            )
            return AlreadyShown()
        return await self._unblock(ref, mention)

    async def build_of_thread(self, channel: str, thread_ts: str | None) -> BuildRef | None:
        """The build this thread is about: a build linked from its first message that the bot
        follows in this very thread (its own build message, or one someone asked it to follow).
        """
        if not thread_ts:
            return None
        root = await self._thread_root(channel, thread_ts)
        if root is None:
            return None
        for ref in build_links(message_texts(root), self.s.settings.buildkite_org):
            try:
                tracked = await self.s.store.find(ref.pipeline, ref.number)
            except RedisError:
                raise UserError(TRACKING_DOWN) from None
            target = tracked.target(channel) if tracked is not None else None
            if target is not None and thread_ts in (target.reply_thread, target.ts):
                return ref
        return None

    async def _thread_root(self, channel: str, thread_ts: str) -> dict[str, Any] | None:
        try:
            response = await self.s.outbox.client.api_call(
                "conversations.replies",
                http_verb="GET",
                params={"channel": channel, "ts": thread_ts, "limit": 1, "inclusive": "true"},
            )
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not read the first message of a thread in %s: %s", channel, exc)
            raise UserError(threads.THREAD_UNREADABLE) from None
        messages = response.get("messages") or []
        first = messages[0] if messages else None
        if not isinstance(first, dict) or first.get("ts") != thread_ts:
            return None
        return first

    async def _status(self, ref: BuildRef) -> Rendered:
        build = await self._get(ref, "read")
        return build_card(ref.pipeline, build, buttons=())

    async def _unblock(self, ref: BuildRef, mention: Mention) -> Outcome:
        """Unblock the build's one waiting step when it asks for nothing; otherwise offer its
        Unblock button, whose form only a click can open (an event has no trigger_id)."""
        build = await self._get(ref, "unblock")
        waiting = [j for j in build.jobs if j.type == "manual" and j.state == "blocked"]
        if not waiting:
            raise UserError(threads.nothing_to_unblock(ref.pipeline, build))
        values = [
            UnblockButtonValue(pipeline=ref.pipeline, number=ref.number, job=j.id) for j in waiting
        ]
        if len(waiting) == 1:
            target = await self.ops.unblock_form(values[0], mention.actor)
            if target.form is not None and not target.form.fields:
                await self.ops.unblock(
                    values[0],
                    mention.actor,
                    label=target.label,
                    fields={},
                    thread=(mention.channel, mention.thread_ts),
                    dedup_key=f"unblock:{ref.pipeline}:{ref.number}:{waiting[0].id}",
                )
                return AlreadyShown()
        steps = [(value, job.display_name) for value, job in zip(values, waiting, strict=True)]
        return Privately(threads.unblock_choices(ref.pipeline, build, steps))

    async def _get(self, ref: BuildRef, action: str) -> Build:
        return await Listings(self.s).build(ref, action=action)


def event_id_of(body: Mapping[str, Any]) -> str | None:
    """The id Slack gives an Events API delivery (the same on each of its retries)."""
    event_id = body.get("event_id")
    return event_id if isinstance(event_id, str) and 0 < len(event_id) <= 64 else None
