"""The one path by which the bot writes build messages to Slack.

It paces posts per channel (Slack allows about one message per second per channel), merges
successive edits of one message so that only the latest state is sent, and lets slack_sdk's
retry handlers honour ``Retry-After`` on 429. Handlers and the tracker never call chat.* directly.

A post given a `key` is made at most once: it carries the key in its message metadata, and it
is never re-sent blindly after an answer that leaves its fate unknown (a connection error, a
timeout, a 5xx). The outbox first looks for it in the channel (conversations.history, or
.replies in a thread) and only posts again when it is not there. The tracker asks for the same
look-up before posting when Redis shows an earlier attempt that was never recorded (a process
killed between Slack's answer and its record).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from app.slack.render.common import Rendered

log = logging.getLogger(__name__)

#: Slack errors worth retrying; any other `ok: false` will fail again however often it is sent.
TEMPORARY_ERRORS = frozenset(
    {
        "ratelimited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "connection_error",
    }
)
#: Failures after which a post may or may not have been made (Slack may have taken it).
UNKNOWN_OUTCOME = TEMPORARY_ERRORS - {"ratelimited"}

#: The message metadata event type that marks the bot's keyed posts.
POST_EVENT_TYPE = "bkchatops_post"
#: How often a keyed post is sent (each resend after a look-up found nothing).
KEYED_POST_ATTEMPTS = 3
#: Look-ups start this long before the first attempt (clock skew between us and Slack).
LOOKUP_MARGIN = 120.0
#: At most this many pages of history are read in one look-up.
LOOKUP_PAGES = 5

#: What the operator should do about the permanent errors seen most often.
PERMANENT_ERRORS: dict[str, str] = {
    "channel_not_found": "the channel does not exist or the bot cannot see it; invite the bot",
    "not_in_channel": "invite the bot to the channel (/invite @buildkite) or add chat:write.public",
    "is_archived": "the channel is archived",
    "message_not_found": "the build's message was deleted",
    "cant_update_message": "the message was not posted by this bot",
    "invalid_blocks": "a rendered message was rejected; please report this as a bug",
    "msg_too_long": "a rendered message was too long; please report this as a bug",
    "restricted_action": "a workspace setting stops the bot from posting there",
    "missing_scope": "the app lacks a scope: reinstall it from manifest.yml",
    "invalid_auth": "SLACK_BOT_TOKEN is wrong or revoked",
    "token_revoked": "SLACK_BOT_TOKEN was revoked: reinstall the app",
}


#: Slack's answers when the bot may not post in a channel: a public one it was not invited to
#: (without chat:write.public), or a private one, which Slack hides from non-members.
NO_ACCESS_ERRORS = frozenset({"not_in_channel", "channel_not_found"})


def not_in_channel_text(error: str) -> str:
    """Tell a person why the bot cannot post in their channel, and how to fix it."""
    # Short enough to fit, with what was done, in a modal's 150-character error.
    return f"The bot cannot post in this channel (`{error}`): invite it with `/invite @buildkite`."


class SlackDeliveryError(Exception):
    """A Slack write failed. `permanent` errors will fail again however often they are retried."""

    def __init__(self, method: str, channel: str, error: str) -> None:
        self.method = method
        self.channel = channel
        self.error = error
        self.permanent = error not in TEMPORARY_ERRORS and not error.startswith("http_5")
        #: The write may have been made although it failed (only a look-up can tell).
        self.unknown_outcome = error in UNKNOWN_OUTCOME or error.startswith("http_5")
        #: The bot may not post in this channel until someone invites it.
        self.no_access = error in NO_ACCESS_ERRORS
        hint = PERMANENT_ERRORS.get(
            error,
            "it will be retried" if not self.permanent else "see Slack's docs for this error",
        )
        super().__init__(f"{method} to channel {channel} failed with {error}: {hint}")


@dataclass
class _Edit:
    """The latest wanted content of one message, and who waits for it to be sent."""

    rendered: Rendered | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    last_sent: float = float("-inf")
    task: asyncio.Task[None] | None = None


class Outbox:
    """Rate-aware sender of chat.postMessage and chat.update."""

    def __init__(
        self,
        client: AsyncWebClient,
        *,
        post_interval: float = 1.0,
        edit_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.post_interval = post_interval
        self.edit_interval = edit_interval
        self._clock = clock
        self._sleep = sleep
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._last_post: dict[str, float] = {}
        self._edits: dict[tuple[str, str], _Edit] = {}
        #: When each message was last edited, for messages with no edit queued, oldest first;
        #: kept for one edit interval, so an edit right after the last one still waits.
        self._edited: dict[tuple[str, str], float] = {}
        self._reported: set[tuple[str, str]] = set()
        #: user -> the id of the bot's DM with them.
        self._dms: dict[str, str] = {}
        # Keyed posts go through a client that never re-sends them on its own after a
        # connection error or a 5xx (the outbox looks first); 429s are still waited out.
        self._keyed_client = AsyncWebClient(
            token=client.token,
            base_url=client.base_url,
            timeout=client.timeout,
            session=client.session,
            retry_handlers=[
                handler
                for handler in client.retry_handlers
                if not isinstance(
                    handler, (AsyncConnectionErrorRetryHandler, AsyncServerErrorRetryHandler)
                )
            ],
        )

    async def post(
        self,
        channel: str,
        rendered: Rendered,
        *,
        thread_ts: str | None = None,
        reply_broadcast: bool = False,
        key: str | None = None,
        tried_since: float | None = None,
    ) -> str:
        """Post a message (paced per channel) and return its ts.

        With a `key`, the post is made at most once (see the module's doc); `tried_since` (unix
        time) says an earlier attempt may have made it then: it is looked for before posting.
        """
        lock = self._channel_locks.setdefault(channel, asyncio.Lock())
        async with lock:
            if key is not None and tried_since is not None:
                found = await self.find_post(channel, key, thread_ts=thread_ts, since=tried_since)
                if found is not None:
                    log.info("post %s in %s was already made (ts %s)", key, channel, found)
                    return found
            kwargs: dict[str, Any] = {
                "channel": channel,
                "text": rendered.text,
                "blocks": rendered.blocks,
                "unfurl_links": False,
                "unfurl_media": False,
            }
            if thread_ts:
                kwargs["thread_ts"] = thread_ts
                if reply_broadcast:
                    kwargs["reply_broadcast"] = True
            if key is None:
                return await self._paced_post(channel, kwargs, self.client)
            kwargs["metadata"] = {"event_type": POST_EVENT_TYPE, "event_payload": {"key": key}}
            since = time.time()
            for attempt in range(1, KEYED_POST_ATTEMPTS):
                try:
                    return await self._paced_post(channel, kwargs, self._keyed_client)
                except SlackDeliveryError as exc:
                    if not exc.unknown_outcome:
                        raise
                await self._sleep(float(attempt))  # let Slack settle before asking it
                found = await self.find_post(channel, key, thread_ts=thread_ts, since=since)
                if found is not None:
                    log.info("post %s in %s was made after all (ts %s)", key, channel, found)
                    return found
            return await self._paced_post(channel, kwargs, self._keyed_client)  # the last try

    async def _paced_post(
        self, channel: str, kwargs: dict[str, Any], client: AsyncWebClient
    ) -> str:
        wait = self._last_post.get(channel, float("-inf")) + self.post_interval - self._clock()
        if wait > 0:
            await self._sleep(wait)
        try:
            response = await self._call("chat.postMessage", channel, kwargs, client)
        finally:
            self._last_post[channel] = self._clock()
        return str(response["ts"])

    async def find_post(
        self, channel: str, key: str, *, thread_ts: str | None, since: float
    ) -> str | None:
        """The ts of the bot's post with this key made since `since` (unix time), if any.

        None also when Slack cannot be asked (say, the history scope is missing): the caller
        then posts, so a message may show twice but is never lost.
        """
        method = "conversations.replies" if thread_ts else "conversations.history"
        params: dict[str, Any] = {
            "channel": channel,
            "oldest": f"{since - LOOKUP_MARGIN:.6f}",
            "include_all_metadata": "true",
            "limit": 200,
        }
        if thread_ts:
            params["ts"] = thread_ts
        for _ in range(LOOKUP_PAGES):
            try:
                response = await self.client.api_call(method, http_verb="GET", params=params)
            except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
                error = _error_of(exc)
                if (channel, method + error) not in self._reported:
                    self._reported.add((channel, method + error))
                    log.error(
                        "cannot check channel %s for a post that may have been made (%s failed "
                        "with %s): posting it, which may show it twice. %s",
                        channel,
                        method,
                        error,
                        LOOKUP_HINTS.get(error, "It will be checked again next time."),
                    )
                return None
            for message in response.get("messages") or []:
                metadata = message.get("metadata") or {}
                payload = metadata.get("event_payload") or {}
                if metadata.get("event_type") == POST_EVENT_TYPE and payload.get("key") == key:
                    return str(message["ts"])
            cursor = (response.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None
            params["cursor"] = cursor
        return None

    async def update(self, channel: str, ts: str, rendered: Rendered) -> None:
        """Edit a message; edits that pile up while one is in flight collapse into the latest."""
        key = (channel, ts)
        self._forget_old_edits()
        edit = self._edits.get(key)
        if edit is None:
            last_sent = self._edited.pop(key, float("-inf"))
            edit = self._edits[key] = _Edit(last_sent=last_sent)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        edit.rendered = rendered
        edit.waiters.append(waiter)
        if edit.task is None or edit.task.done():
            edit.task = asyncio.create_task(self._send_edits(key, edit))
        await waiter

    async def _send_edits(self, key: tuple[str, str], edit: _Edit) -> None:
        channel, ts = key
        while edit.rendered is not None:
            rendered, waiters = edit.rendered, edit.waiters
            edit.rendered, edit.waiters = None, []
            wait = edit.last_sent + self.edit_interval - self._clock()
            if wait > 0:
                await self._sleep(wait)
                if edit.rendered is not None:  # a newer state arrived meanwhile: send that one
                    rendered, waiters = edit.rendered, waiters + edit.waiters
                    edit.rendered, edit.waiters = None, []
            kwargs = {
                "channel": channel,
                "ts": ts,
                "text": rendered.text,
                "blocks": rendered.blocks,
            }
            try:
                await self._call("chat.update", channel, kwargs)
            except Exception as exc:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
            else:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            finally:
                edit.last_sent = self._clock()
        if self._edits.get(key) is edit:
            del self._edits[key]
            self._edited[key] = edit.last_sent  # a new key: the newest goes last

    def _forget_old_edits(self) -> None:
        """Drop the edit times that can no longer delay an edit (the oldest come first)."""
        horizon = self._clock() - self.edit_interval
        while self._edited:
            key, sent = next(iter(self._edited.items()))
            if sent > horizon:
                break
            del self._edited[key]

    async def _call(
        self,
        method: str,
        channel: str,
        kwargs: dict[str, Any],
        client: AsyncWebClient | None = None,
    ) -> Any:
        try:
            return await (client or self.client).api_call(method, json=kwargs)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as exc:
            error = _error_of(exc)
            failure = SlackDeliveryError(method, channel, error)
            if failure.permanent:
                # Logged once per channel and error, so a misconfigured channel does not flood logs.
                if (channel, error) not in self._reported:
                    self._reported.add((channel, error))
                    log.error("slack write failed: %s", failure)
            else:
                log.warning("slack write failed: %s", failure)
            raise failure from None

    async def ephemeral(
        self, channel: str, user: str, rendered: Rendered, *, thread_ts: str | None = None
    ) -> None:
        """A message only `user` sees, for answers with no response_url (modal submissions,
        events); with `thread_ts`, shown in that thread."""
        kwargs: dict[str, Any] = {
            "channel": channel,
            "user": user,
            "text": rendered.text,
            "blocks": rendered.blocks,
        }
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        await self._call("chat.postEphemeral", channel, kwargs)

    async def unfurl(
        self,
        unfurls: dict[str, dict[str, Any]],
        *,
        channel: str,
        ts: str | None = None,
        unfurl_id: str | None = None,
        source: str | None = None,
    ) -> None:
        """Attach `unfurls` (url -> blocks) to the shared links of one message: named by its
        `unfurl_id` and `source` when Slack gave them (a draft in the composer has no ts), else
        by `channel` and `ts`. Unfurling the same links again replaces what was attached."""
        kwargs: dict[str, Any] = {"unfurls": unfurls}
        if unfurl_id and source:
            kwargs.update(unfurl_id=unfurl_id, source=source)
        else:
            kwargs.update(channel=channel, ts=ts)
        await self._call("chat.unfurl", channel, kwargs)

    async def open_dm(self, user: str) -> str:
        """The id of the bot's DM with `user` (conversations.open, the same id each time)."""
        channel = self._dms.get(user)
        if channel is None:
            response = await self._call("conversations.open", user, {"users": user})
            channel = self._dms[user] = str((response.get("channel") or {})["id"])
        return channel

    async def publish_home(self, user: str, view: dict[str, Any]) -> None:
        """Publish a person's App Home tab (views.publish; a 429 waits out its Retry-After)."""
        await self._call("views.publish", f"home:{user}", {"user_id": user, "view": view})

    async def open_view(self, trigger_id: str, view: dict[str, Any]) -> None:
        """Open the modal `view` for the click or command that sent `trigger_id` (3 s to live)."""
        await self.client.views_open(trigger_id=trigger_id, view=view)

    async def drain(self) -> None:
        """Wait for edits in flight (used at shutdown)."""
        tasks = [e.task for e in self._edits.values() if e.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


#: What to do when a look-up for an earlier post fails.
LOOKUP_HINTS = {
    "missing_scope": "Add the channels:history and groups:history scopes (reinstall the app from "
    "manifest.yml).",
    "not_in_channel": "Invite the bot to the channel (/invite @buildkite).",
    "channel_not_found": "Invite the bot to the channel (/invite @buildkite).",
}


def _error_of(exc: BaseException) -> str:
    """Slack's error code for a failed call, `http_<status>`, or `connection_error`."""
    if isinstance(exc, SlackApiError):
        response = exc.response
        body = response.get("error") if hasattr(response, "get") else None
        status = getattr(response, "status_code", None) or getattr(response, "status", 0)
        return str(body or f"http_{status}")
    return "connection_error"
