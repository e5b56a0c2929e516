"""The fake Slack's workspace in memory: users, channels, messages and views, how tests seed it and
look into it. Part of the sandbox's and the tests' simulator of Slack.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from app.simulators.slack_records import (
    MANIFEST_SCOPES,
    Json,
    RecordedCall,
    ResponseUrlPost,
    T,
    _Fault,
    _ResponseUrl,
    _Socket,
)

#: How long `wait_for` waits by default before failing: generous, since a condition that holds
#: returns at once and a shared two-core CI machine has been seen to take over 5 s.
WAIT_TIMEOUT = 30.0


class SlackState:
    """A Slack workspace in memory: what the fake serves and tests seed and inspect."""

    def __init__(
        self,
        bot_token: str = "xoxb-test",
        app_token: str = "xapp-test",
        team_id: str = "T0001",
        bot_user_id: str = "U0BOT",
        *,
        bot_id: str = "B0BOT",
        app_id: str = "A0FAKE",
        seed: bool = True,
        latency: float = 0.0,
        scopes: frozenset[str] = MANIFEST_SCOPES,
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.team_id = team_id
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.app_id = app_id
        self.latency = latency  # seconds added to every Web API answer
        self.scopes = scopes  # the bot token's scopes

        self.calls: list[RecordedCall] = []
        self.responses: list[ResponseUrlPost] = []
        self.unexpected: list[str] = []
        self.acks: list[Json] = []  # every Socket Mode ack, as received
        # channel -> ts -> current message (includes "channel")
        self.messages: dict[str, dict[str, Json]] = {}
        # channel -> ts -> ephemeral message (includes "user", whom it was shown to)
        self.ephemeral_messages: dict[str, dict[str, Json]] = {}
        self.views: dict[str, Json] = {}
        self.users: dict[str, Json] = {}
        self.channels: dict[str, Json] = {}
        self.usergroups: dict[str, list[str]] = {}
        #: user id -> the Home tab the app last published for them (views.publish).
        self.home_views: dict[str, Json] = {}
        #: The app has a Home tab (manifest: features.app_home.home_tab_enabled).
        self.home_tab_enabled = True
        #: unfurl_id -> the shared links Slack told the app about (see `share_links`).
        self.shared_links: dict[str, Json] = {}

        self._faults: dict[str, list[_Fault]] = {}
        self._drop_answers: dict[str, int] = {}
        self._other_bot_tokens: set[str] = set()
        self._response_urls: dict[str, _ResponseUrl] = {}
        self._used_triggers: set[str] = set()
        self._ts_micros = itertools.count(1_700_000_000_000_100, 100)
        self._ids = itertools.count(1)
        self._tickets: set[str] = set()
        self._sockets: list[_Socket] = []
        self._pending_acks: dict[str, asyncio.Future[Json]] = {}
        self._runner: web.AppRunner | None = None
        self._base_url = ""

        if seed:
            self.add_user(bot_user_id, "chatops", "", is_bot=True)
            self.add_user("U0USER", "alice", "alice@example.com")
            self.add_channel("C0CHAN", "deploys")

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, without a trailing slash."""
        if not self._base_url:
            raise RuntimeError("FakeSlack is not started")
        return self._base_url

    @property
    def api_url(self) -> str:
        """The Web API base URL for `AsyncWebClient(base_url=...)`, with a trailing slash."""
        return f"{self.base_url}/api/"

    @property
    def hooks_url(self) -> str:
        """The prefix of every response_url this fake hands out (the bot's SLACK_HOOKS_URL), as
        `https://hooks.slack.com/` is for Slack's."""
        return f"{self.base_url}/response/"

    def response_url(
        self, name: str, *, channel: str | None = None, message_ts: str | None = None
    ) -> str:
        """A response_url whose posts are recorded in `responses` under `name`.

        With `channel` (and `message_ts`, the message the interaction came from), posts also
        act on `messages`: `replace_original`/`delete_original` edit or drop that message, and
        `response_type: in_channel` posts a new one.
        """
        self._response_urls.setdefault(name, _ResponseUrl(channel, message_ts))
        return f"{self.hooks_url}{name}"

    # ------------------------------------------------------------------ seeding

    def add_user(
        self,
        user_id: str,
        name: str,
        email: str,
        *,
        real_name: str | None = None,
        is_bot: bool = False,
        tz: str = "Europe/London",
    ) -> Json:
        """Add a workspace member, returned by users.info and users.lookupByEmail."""
        real = real_name or name.title()
        user: Json = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "deleted": False,
            "real_name": real,
            "tz": tz,
            "tz_label": tz,
            "tz_offset": 0,
            "is_admin": False,
            "is_owner": False,
            "is_bot": is_bot,
            "is_app_user": False,
            "updated": 1_700_000_000,
            "profile": {
                "real_name": real,
                "real_name_normalized": real,
                "display_name": name,
                "display_name_normalized": name,
                "email": email,
                "team": self.team_id,
            },
        }
        if is_bot:
            user["profile"]["bot_id"] = self.bot_id
            user["profile"].pop("email")
        self.users[user_id] = user
        return user

    def add_channel(
        self, channel_id: str, name: str, *, is_private: bool = False, is_member: bool = True
    ) -> Json:
        """Add a channel, returned by conversations.info and accepted as `#name`."""
        channel: Json = {
            "id": channel_id,
            "name": name,
            "name_normalized": name,
            "is_channel": not is_private,
            "is_group": is_private,
            "is_im": False,
            "is_mpim": False,
            "is_private": is_private,
            "is_archived": False,
            "is_general": False,
            "is_member": is_member,
            "is_shared": False,
            "is_ext_shared": False,
            "is_org_shared": False,
            "created": 1_700_000_000,
            "creator": "U0USER",
            "context_team_id": self.team_id,
        }
        self.channels[channel_id] = channel
        return channel

    def add_bot_to(self, channel_id: str) -> None:
        """Invite the bot to a channel (as `/invite @bot` does)."""
        self.channels[channel_id]["is_member"] = True

    def remove_bot_from(self, channel_id: str) -> None:
        """Take the bot out of a channel (someone removed it, or it was never invited); a channel
        never seeded becomes a public one of that id."""
        if channel_id not in self.channels:
            self.add_channel(channel_id, channel_id.lower())
        self.channels[channel_id]["is_member"] = False

    def add_ephemeral(
        self, channel: str, user: str, text: str = "", *, blocks: list[Json] | None = None
    ) -> str:
        """Show `user` an ephemeral message from the bot, as a response_url or chat.postEphemeral
        would; returns its ts, for a click on it (`block_action_payload(..., ephemeral=True)`)."""
        return str(self._store_ephemeral(channel, user, text, blocks or [])["ts"])

    def add_usergroup(self, usergroup_id: str, users: list[str]) -> None:
        """Add a user group, returned by usergroups.users.list."""
        self.usergroups[usergroup_id] = list(users)

    def add_message(
        self,
        channel: str,
        text: str = "",
        *,
        blocks: list[Json] | None = None,
        thread_ts: str | None = None,
        user: str | None = None,
    ) -> str:
        """Put a message in the history without an API call (e.g. one posted before a restart)."""
        message = self._store_message(
            channel, text, blocks or [], thread_ts=thread_ts, user=user or self.bot_user_id
        )
        return str(message["ts"])

    def share_links(
        self,
        channel: str,
        user: str,
        urls: list[str],
        *,
        text: str | None = None,
        thread_ts: str | None = None,
        source: str = "conversations_history",
    ) -> Json:
        """A person posts (or, with `source="composer"`, is still typing) a message with these
        links: returns the `link_shared` event Slack sends the app, whose `unfurl_id` (or
        channel and message_ts) chat.unfurl then names."""
        if source == "conversations_history":
            ts = self.add_message(channel, text or " ".join(urls), thread_ts=thread_ts, user=user)
        else:
            ts = self._next_ts()  # a draft: no message exists yet
        unfurl_id = f"{channel}.{ts}.{next(self._ids):08x}"
        links = [{"domain": url.split("/")[2], "url": url} for url in urls]
        self.shared_links[unfurl_id] = {
            "channel": channel,
            "message_ts": ts,
            "source": source,
            "links": links,
        }
        event: Json = {
            "type": "link_shared",
            "channel": channel,
            "is_bot_user_member": True,
            "user": user,
            "message_ts": ts,
            "unfurl_id": unfurl_id,
            "source": source,
            "links": links,
            "event_ts": ts,
        }
        if thread_ts:
            event["thread_ts"] = thread_ts
        return event

    def add_bot_token(self, token: str) -> None:
        """Accept another bot token too, e.g. one per bot process, so that the `Authorization`
        header of each recorded call tells which process made it."""
        self._other_bot_tokens.add(token)

    # ------------------------------------------------------------------ inspection

    def calls_to(self, method: str) -> list[RecordedCall]:
        """Every recorded call of `method`, failed ones included."""
        return [c for c in self.calls if c.method == method]

    def posts(self, channel: str | None = None) -> list[RecordedCall]:
        """Successful chat.postMessage calls, optionally to one channel."""
        return [
            c
            for c in self.calls_to("chat.postMessage")
            if c.ok and (channel is None or c.response.get("channel") == channel)
        ]

    def updates(self, channel: str | None = None) -> list[RecordedCall]:
        """Successful chat.update calls, optionally in one channel."""
        return [
            c
            for c in self.calls_to("chat.update")
            if c.ok and (channel is None or c.response.get("channel") == channel)
        ]

    def ephemerals(self, user: str | None = None) -> list[RecordedCall]:
        """Successful chat.postEphemeral calls, optionally to one user."""
        return [
            c
            for c in self.calls_to("chat.postEphemeral")
            if c.ok and (user is None or c.args.get("user") == user)
        ]

    def message(self, channel: str, ts: str) -> Json:
        """The current state of a message; AssertionError when there is none."""
        try:
            return self.messages[channel][ts]
        except KeyError:
            known = sorted(self.messages.get(channel, {}))
            raise AssertionError(f"no message {ts} in {channel}; messages there: {known}") from None

    def thread(self, channel: str, thread_ts: str) -> list[Json]:
        """The replies in a thread, oldest first, without the parent message."""
        return sorted(
            (
                m
                for m in self.messages.get(channel, {}).values()
                if m.get("thread_ts") == thread_ts and m["ts"] != thread_ts
            ),
            key=lambda m: str(m["ts"]),
        )

    def history(self, channel: str) -> list[Json]:
        """Top-level messages of a channel (thread broadcasts included), oldest first."""
        return sorted(
            (
                m
                for m in self.messages.get(channel, {}).values()
                if m.get("thread_ts") in (None, m["ts"]) or m.get("reply_broadcast")
            ),
            key=lambda m: str(m["ts"]),
        )

    async def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = WAIT_TIMEOUT,  # noqa: ASYNC109
    ) -> T:
        """Poll until `predicate()` is truthy and return it, or fail showing what was recorded.

        `timeout` is a deadline for a hung bot, not a measure of its speed: a condition met
        at once returns at once, and a loaded CI machine may take many seconds to meet it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if loop.time() >= deadline:
                raise AssertionError(
                    f"condition not met within {timeout}s; fake Slack saw:\n{self.describe()}"
                )
            await asyncio.sleep(0.01)

    def describe(self) -> str:
        """A readable dump of everything recorded, for assertion messages."""
        lines = [f"calls ({len(self.calls)}):"]
        for c in self.calls:
            args = {k: v for k, v in c.args.items() if k != "blocks"}
            blocks = f" +{len(c.args['blocks'])} blocks" if c.args.get("blocks") else ""
            outcome = "ok" if c.ok else f"{c.status} {c.response.get('error')}"
            lines.append(f"  {c.method} {json.dumps(args, default=str)[:300]}{blocks} -> {outcome}")
        lines.append(f"response_url posts ({len(self.responses)}):")
        lines.extend(f"  {r.name} {json.dumps(r.json)[:300]}" for r in self.responses)
        lines.append(f"socket acks ({len(self.acks)}):")
        lines.extend(f"  {json.dumps(a)[:300]}" for a in self.acks)
        lines.append(f"unexpected: {self.unexpected}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ storing messages

    def _next_ts(self) -> str:
        # Like Slack's: the current time, strictly increasing (look-ups filter on `oldest`).
        micros = max(next(self._ts_micros), time.time_ns() // 1000)
        self._ts_micros = itertools.count(micros + 100, 100)
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _store_ephemeral(self, channel: str, user: str, text: str, blocks: list[Json]) -> Json:
        ts = self._next_ts()
        message: Json = {
            "type": "message",
            "subtype": "ephemeral",
            "channel": channel,
            "user": user,
            "ts": ts,
            "text": text,
            "blocks": blocks,
            "bot_id": self.bot_id,
        }
        self.ephemeral_messages.setdefault(channel, {})[ts] = message
        return message

    def _store_message(
        self,
        channel: str,
        text: str,
        blocks: list[Json],
        *,
        thread_ts: str | None = None,
        reply_broadcast: bool = False,
        user: str | None = None,
        metadata: Any = None,
        attachments: Any = None,
    ) -> Json:
        in_channel = self.messages.setdefault(channel, {})
        ts = self._next_ts()
        message: Json = {
            "type": "message",
            "channel": channel,
            "ts": ts,
            "text": text,
            "blocks": blocks,
            "user": user or self.bot_user_id,
            "team": self.team_id,
        }
        if (user or self.bot_user_id) == self.bot_user_id:
            message.update(bot_id=self.bot_id, app_id=self.app_id)
        if metadata is not None:
            message["metadata"] = metadata
        if attachments is not None:
            message["attachments"] = attachments
        if thread_ts:
            parent = in_channel.get(thread_ts)
            if parent is None and thread_ts in self.ephemeral_messages.get(channel, {}):
                # An ephemeral message is no thread: nobody else would ever see the reply.
                self.unexpected.append(f"reply in {channel} threaded under ephemeral {thread_ts}")
            elif parent is None:
                # Slack accepts this silently; for the bot it means a lost or wrong thread.
                self.unexpected.append(f"reply in {channel} to unknown thread_ts {thread_ts}")
            else:
                thread_ts = str(parent.get("thread_ts") or thread_ts)
                root = in_channel.get(thread_ts, parent)
                root["thread_ts"] = thread_ts
                root["reply_count"] = int(root.get("reply_count", 0)) + 1
                root["latest_reply"] = ts
                message["parent_user_id"] = root["user"]
            message["thread_ts"] = thread_ts
            message["reply_broadcast"] = reply_broadcast
            if reply_broadcast:
                message["subtype"] = "thread_broadcast"
        in_channel[ts] = message
        return message
