"""A fake Slack: a real aiohttp server that answers the Web API, response_urls and Socket Mode.

It is the sandbox's and the tests' simulator of Slack, shipped in the package.

Point `AsyncWebClient(base_url=fake.api_url)` at it, drive the bot with `socket_send()` or
signed HTTP requests, then assert on `calls`, `messages` and `responses`. Anything the fake
does not expect lands in `unexpected`, which tests assert is empty.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

T = TypeVar("T")
Json = dict[str, Any]

# Form bodies carry structured arguments as JSON strings; these are decoded before recording.
JSON_FIELDS = frozenset({"blocks", "attachments", "view", "metadata"})
# slack_sdk sends booleans in query/form params as "1"/"0"; these are decoded to bool.
BOOL_FIELDS = frozenset(
    {
        "as_user",
        "include_all_metadata",
        "include_disabled",
        "inclusive",
        "include_locale",
        "include_num_members",
        "link_names",
        "mrkdwn",
        "reply_broadcast",
        "unfurl_links",
        "unfurl_media",
    }
)
APP_TOKEN_METHODS = frozenset({"apps.connections.open"})
PERMALINK_BASE = "https://fake-workspace.slack.com/archives"
RESPONSE_URL_MAX_USES = 5
#: Slack answers `msg_blocks_too_long` for a message whose blocks are much over 13k characters
#: in all (seen in practice; not documented exactly): measured here on the blocks' JSON.
MAX_BLOCKS_JSON = 13_000
#: The bot scopes manifest.yml asks for; `chat:write.public` lets it post in public channels
#: it is not a member of.
MANIFEST_SCOPES = frozenset(
    {
        "commands",
        "chat:write",
        "chat:write.public",
        "channels:history",
        "groups:history",
        "users:read",
        "users:read.email",
        "usergroups:read",
    }
)


@dataclass(frozen=True)
class RecordedCall:
    """One Web API request: what was sent and what the fake answered."""

    method: str
    args: Json
    headers: dict[str, str]
    time: float  # time.monotonic() when the request arrived
    status: int
    response: Json
    content_type: str = ""
    #: The call was carried out but its answer never reached the caller (`drop_answer_next`).
    answer_lost: bool = False
    #: "host:port" of the client's end of the connection, to count the connections used.
    peer: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.response.get("ok"))


@dataclass(frozen=True)
class ResponseUrlPost:
    """One POST to a response_url handed out by `FakeSlack.response_url()`."""

    name: str
    json: Json
    headers: dict[str, str]
    time: float


@dataclass
class _Fault:
    error: str
    status: int
    retry_after: int
    remaining: int


@dataclass
class _ResponseUrl:
    channel: str | None
    message_ts: str | None
    uses: int = 0


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    ticket: str
    connected_at: float = field(default_factory=time.monotonic)


class _ApiError(Exception):
    """Raised inside a method handler to answer `{"ok": false, "error": code}`."""

    def __init__(self, code: str, *, unexpected: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.unexpected = unexpected


Handler = Callable[[Json], Json]


class FakeSlack:
    """A fake Slack workspace served on 127.0.0.1 on a free port.

    Seeded with user U0USER ("alice", alice@example.com), channel C0CHAN ("#deploys") and the
    bot user itself unless `seed=False`.

    Channel membership is honest: posting in a channel the bot is not a member of answers
    `not_in_channel` (a public channel, without `chat:write.public` among `scopes`) or
    `channel_not_found` (a private channel, which Slack hides from non-members). Channels a test
    never seeded are taken to be public channels the bot is in. Ephemeral messages are kept
    apart from the channel's (`ephemeral_messages`): Slack cannot edit them with chat.update, and a
    reply threaded under one is lost.
    """

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

        self._methods: dict[str, Handler] = {
            "auth.test": self._auth_test,
            "apps.connections.open": self._apps_connections_open,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.getPermalink": self._chat_get_permalink,
            "users.info": self._users_info,
            "users.lookupByEmail": self._users_lookup_by_email,
            "conversations.info": self._conversations_info,
            "conversations.history": self._conversations_history,
            "conversations.replies": self._conversations_replies,
            "usergroups.users.list": self._usergroups_users_list,
            "views.open": self._views_open,
            "views.update": self._views_update,
        }

        if seed:
            self.add_user(bot_user_id, "chatops", "", is_bot=True)
            self.add_user("U0USER", "alice", "alice@example.com")
            self.add_channel("C0CHAN", "deploys")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve on a free port of 127.0.0.1."""
        app = web.Application(middlewares=[self._guard])
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{name}", self._response_url_post)
        app.router.add_get("/socket-mode/{ticket}", self._socket_mode)
        app.router.add_route("*", "/{tail:.*}", self._unknown_path)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self._base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Close every Socket Mode connection, fail pending `socket_send`s and stop serving."""
        for future in self._pending_acks.values():
            if not future.done():
                future.cancel()
        for sock in list(self._sockets):
            await sock.ws.close(code=1001, message=b"fake slack stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

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

    def add_bot_token(self, token: str) -> None:
        """Accept another bot token too, e.g. one per bot process, so that the `Authorization`
        header of each recorded call tells which process made it."""
        self._other_bot_tokens.add(token)

    # ------------------------------------------------------------------ fault injection

    def fail_next(
        self,
        method: str,
        error: str = "ratelimited",
        status: int | None = None,
        retry_after: int = 1,
        n: int = 1,
    ) -> None:
        """Answer the next `n` calls of `method` with `error`.

        `ratelimited` answers HTTP 429 with `Retry-After: retry_after`; other errors answer
        HTTP 200 with `{"ok": false, "error": error}`. `status` overrides the HTTP status.
        """
        code = status if status is not None else (429 if error == "ratelimited" else 200)
        self._faults.setdefault(method, []).append(_Fault(error, code, retry_after, n))

    def drop_answer_next(self, method: str, n: int = 1) -> None:
        """Carry out the next `n` calls of `method`, then cut the connection instead of answering:
        the caller cannot tell whether the call was made (as when Slack's answer is lost)."""
        self._drop_answers[method] = self._drop_answers.get(method, 0) + n

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

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:  # noqa: ASYNC109
        """Poll until `predicate()` is truthy and return it, or fail showing what was recorded."""
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

    # ------------------------------------------------------------------ Socket Mode driver

    @property
    def socket_connected(self) -> bool:
        return any(not s.ws.closed for s in self._sockets)

    async def wait_socket_connected(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until a Socket Mode client is connected and has been sent `hello`."""
        await self.wait_for(lambda: self.socket_connected, timeout=timeout)

    async def socket_send(
        self,
        payload_type: str,
        payload: Mapping[str, Any],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109
        accepts_response_payload: bool | None = None,
        retry_attempt: int = 0,
        retry_reason: str = "",
    ) -> Json | None:
        """Deliver `payload` in a Socket Mode envelope and return the ack's payload.

        `payload_type` is "slash_commands", "interactive" or "events_api". Returns None when
        the ack carried no payload; raises TimeoutError when no ack comes within `timeout`.
        """
        live = [s for s in self._sockets if not s.ws.closed]
        if not live:
            raise AssertionError("socket_send: no Socket Mode client is connected")
        envelope_id = str(uuid.uuid4())
        envelope: Json = {
            "envelope_id": envelope_id,
            "type": payload_type,
            "payload": dict(payload),
            "accepts_response_payload": (
                payload_type != "events_api"
                if accepts_response_payload is None
                else accepts_response_payload
            ),
        }
        if payload_type == "events_api":
            envelope["retry_attempt"] = retry_attempt
            envelope["retry_reason"] = retry_reason
        ack: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
        self._pending_acks[envelope_id] = ack
        try:
            await live[-1].ws.send_str(json.dumps(envelope))
            async with asyncio.timeout(timeout):
                message = await ack
        except TimeoutError:
            raise TimeoutError(
                f"no ack for {payload_type} envelope within {timeout}s; "
                f"fake Slack saw:\n{self.describe()}"
            ) from None
        finally:
            self._pending_acks.pop(envelope_id, None)
        result = message.get("payload")
        return result if isinstance(result, dict) else None

    async def socket_disconnect(self, reason: str = "refresh_requested") -> None:
        """Ask the connected client to reconnect, as Slack does every few hours."""
        for sock in self._sockets:
            if not sock.ws.closed:
                await sock.ws.send_str(
                    json.dumps(
                        {
                            "type": "disconnect",
                            "reason": reason,
                            "debug_info": {"host": "fake-slack"},
                        }
                    )
                )

    # ------------------------------------------------------------------ HTTP plumbing

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:  # a bug in the fake or a request it cannot read: be loud
            self.unexpected.append(
                f"{request.method} {request.path} crashed the fake: {type(e).__name__}: {e}"
            )
            return web.json_response({"ok": False, "error": "fake_internal_error"}, status=500)

    async def _unknown_path(self, request: web.Request) -> web.Response:
        self.unexpected.append(f"{request.method} {request.path_qs}: unknown path")
        return web.json_response({"ok": False, "error": "unknown_method"}, status=404)

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        arrived = time.monotonic()
        headers = dict(request.headers)
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peer = f"{peername[0]}:{peername[1]}" if peername else ""
        extra_headers: dict[str, str] = {}
        try:
            args = await self._read_args(request)
        except _ApiError as e:
            args = {}
            status, body = 200, {"ok": False, "error": e.code}
            self.unexpected.append(f"{method}: {e.unexpected or e.code}")
        else:
            status, body, extra_headers = self._answer(method, args, headers)
        if self.latency:
            await asyncio.sleep(self.latency)
        dropped = self._drop_answers.get(method, 0) > 0
        if dropped:
            self._drop_answers[method] -= 1
        self.calls.append(
            RecordedCall(
                method=method,
                args=args,
                headers=headers,
                time=arrived,
                status=status,
                response=body,
                content_type=request.content_type,
                answer_lost=dropped,
                peer=peer,
            )
        )
        if dropped and request.transport is not None:
            request.transport.close()  # the client sees the connection drop, with no answer
        return web.json_response(body, status=status, headers=extra_headers)

    def _answer(
        self, method: str, args: Json, headers: Mapping[str, str]
    ) -> tuple[int, Json, dict[str, str]]:
        handler = self._methods.get(method)
        if handler is None:
            self.unexpected.append(f"unknown Web API method {method} (args {args})")
            return 404, {"ok": False, "error": "unknown_method"}, {}
        auth_error = self._check_token(method, args, headers)
        if auth_error:
            return 200, {"ok": False, "error": auth_error}, {}
        fault = self._take_fault(method)
        if fault is not None:
            extra = {"Retry-After": str(fault.retry_after)} if fault.status == 429 else {}
            return fault.status, {"ok": False, "error": fault.error}, extra
        try:
            return 200, handler(args), {}
        except _ApiError as e:
            if e.unexpected:
                self.unexpected.append(f"{method}: {e.unexpected}")
            return 200, {"ok": False, "error": e.code}, {}

    def _check_token(self, method: str, args: Json, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth else str(args.pop("token", ""))
        args.pop("token", None)
        if not token:
            return "not_authed"
        expected = self.app_token if method in APP_TOKEN_METHODS else self.bot_token
        if token == expected:
            return None
        if method not in APP_TOKEN_METHODS and token in self._other_bot_tokens:
            return None
        if token in (self.app_token, self.bot_token):
            return "not_allowed_token_type"
        return "invalid_auth"

    def _take_fault(self, method: str) -> _Fault | None:
        queue = self._faults.get(method)
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.pop(0)
        return fault

    async def _read_args(self, request: web.Request) -> Json:
        args: Json = dict(request.query)
        if request.body_exists:
            ctype = request.content_type
            if ctype == "application/json":
                try:
                    body = await request.json()
                except json.JSONDecodeError as e:
                    raise _ApiError("invalid_json", unexpected=f"body is not JSON: {e}") from e
                if not isinstance(body, dict):
                    raise _ApiError("json_not_object", unexpected="JSON body is not an object")
                args.update(body)
            elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                form = await request.post()
                args.update({k: v for k, v in form.items() if isinstance(v, str)})
            else:
                raise _ApiError("invalid_post_type", unexpected=f"unsupported body type {ctype}")
        for key in JSON_FIELDS & args.keys():
            if isinstance(args[key], str):
                try:
                    args[key] = json.loads(args[key])
                except json.JSONDecodeError as e:
                    raise _ApiError(
                        "invalid_arguments", unexpected=f"{key} is not valid JSON: {e}"
                    ) from e
        for key in BOOL_FIELDS & args.keys():
            if isinstance(args[key], str):
                args[key] = args[key].lower() in ("1", "true")
        return args

    # ------------------------------------------------------------------ Web API methods

    def _auth_test(self, args: Json) -> Json:
        return {
            "ok": True,
            "url": "https://fake-workspace.slack.com/",
            "team": "Fake Workspace",
            "user": "chatops",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "app_id": self.app_id,
            "is_enterprise_install": False,
        }

    def _apps_connections_open(self, args: Json) -> Json:
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        ws_base = self.base_url.replace("http://", "ws://", 1)
        return {"ok": True, "url": f"{ws_base}/socket-mode/{ticket}"}

    def _chat_post_message(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        self._check_can_post(channel)
        text, blocks = self._content_args(args, required=True)
        thread_ts = args.get("thread_ts") or None
        message = self._store_message(
            channel,
            text or "",
            blocks or [],
            thread_ts=str(thread_ts) if thread_ts else None,
            reply_broadcast=bool(args.get("reply_broadcast")),
            metadata=args.get("metadata"),
            attachments=args.get("attachments"),
        )
        return {"ok": True, "channel": channel, "ts": message["ts"], "message": _public(message)}

    def _chat_update(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        ts = str(args.get("ts") or "")
        message = self.messages.get(channel, {}).get(ts)
        if message is None:
            if ts in self.ephemeral_messages.get(channel, {}):
                # Slack keeps no copy of an ephemeral message: only its response_url edits it.
                raise _ApiError(
                    "message_not_found", unexpected=f"chat.update of ephemeral message {ts}"
                )
            raise _ApiError("message_not_found")
        if not any(k in args for k in ("text", "blocks", "attachments")):
            raise _ApiError("no_text")
        text, blocks = self._content_args(args, required=False)
        if "text" in args:
            message["text"] = text or ""
        if "blocks" in args:
            message["blocks"] = blocks or []
        if "attachments" in args:
            message["attachments"] = args["attachments"]
        if "metadata" in args:
            message["metadata"] = args["metadata"]
        message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "text": message["text"],
            "message": _public(message),
        }

    def _chat_post_ephemeral(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        if not args.get("user"):
            raise _ApiError("user_not_in_channel")
        self._check_can_post(channel)
        text, blocks = self._content_args(args, required=True)
        message = self._store_ephemeral(channel, str(args["user"]), text or "", blocks or [])
        return {"ok": True, "message_ts": message["ts"]}

    def _chat_get_permalink(self, args: Json) -> Json:
        channel = self._channel_arg(args)
        ts = str(args.get("message_ts") or "")
        message = self.messages.get(channel, {}).get(ts)
        if message is None:
            raise _ApiError("message_not_found")
        link = f"{PERMALINK_BASE}/{channel}/p{ts.replace('.', '')}"
        thread_ts = message.get("thread_ts")
        if thread_ts and thread_ts != ts:
            link += f"?thread_ts={thread_ts}&cid={channel}"
        return {"ok": True, "channel": channel, "permalink": link}

    def _users_info(self, args: Json) -> Json:
        user = self.users.get(str(args.get("user") or ""))
        if user is None:
            raise _ApiError("user_not_found")
        return {"ok": True, "user": user}

    def _users_lookup_by_email(self, args: Json) -> Json:
        email = str(args.get("email") or "").lower()
        for user in self.users.values():
            if email and str(user["profile"].get("email", "")).lower() == email:
                return {"ok": True, "user": user}
        raise _ApiError("users_not_found")

    def _conversations_info(self, args: Json) -> Json:
        channel = self.channels.get(str(args.get("channel") or ""))
        if channel is None:
            raise _ApiError("channel_not_found")
        return {"ok": True, "channel": channel}

    def _conversations_history(self, args: Json) -> Json:
        """Top-level messages (and thread broadcasts), newest first, paged by cursor."""
        channel = self._channel_arg(args)
        if channel not in self.channels and channel not in self.messages:
            raise _ApiError("channel_not_found")
        found = [m for m in self.history(channel) if self._in_window(m, args)]
        return self._page(list(reversed(found)), args)

    def _conversations_replies(self, args: Json) -> Json:
        """A thread: its parent first, then the replies oldest first, paged by cursor."""
        channel = self._channel_arg(args)
        ts = str(args.get("ts") or "")
        parent = self.messages.get(channel, {}).get(ts)
        if parent is None:
            raise _ApiError("thread_not_found")
        root = str(parent.get("thread_ts") or ts)
        replies = [m for m in self.thread(channel, root) if self._in_window(m, args)]
        return self._page([self.messages[channel][root], *replies], args)

    @staticmethod
    def _in_window(message: Json, args: Json) -> bool:
        ts = float(message["ts"])
        inclusive = bool(args.get("inclusive"))
        oldest = float(args.get("oldest") or "-inf")
        latest = float(args.get("latest") or "inf")
        if inclusive:
            return oldest <= ts <= latest
        return oldest < ts < latest

    @staticmethod
    def _page(found: list[Json], args: Json) -> Json:
        limit = min(int(args.get("limit") or 100), 999)
        start = int(str(args.get("cursor") or "0").removeprefix("page:") or 0)
        page = found[start : start + limit]
        with_metadata = bool(args.get("include_all_metadata"))
        shown = [
            {k: v for k, v in _public(m).items() if with_metadata or k != "metadata"} for m in page
        ]
        more = start + limit < len(found)
        return {
            "ok": True,
            "messages": shown,
            "has_more": more,
            "response_metadata": {"next_cursor": f"page:{start + limit}" if more else ""},
        }

    def _usergroups_users_list(self, args: Json) -> Json:
        users = self.usergroups.get(str(args.get("usergroup") or ""))
        if users is None:
            raise _ApiError("no_such_subteam")
        return {"ok": True, "users": list(users)}

    def _views_open(self, args: Json) -> Json:
        trigger_id = str(args.get("trigger_id") or "")
        if not trigger_id:
            raise _ApiError("invalid_trigger_id")
        if trigger_id in self._used_triggers:
            raise _ApiError("exchanged_trigger_id")
        self._used_triggers.add(trigger_id)
        view_args = self._view_arg(args)
        view_id = f"V{next(self._ids):08d}"
        view = {
            **view_args,
            "id": view_id,
            "team_id": self.team_id,
            "state": {"values": {}},
            "hash": self._next_ts() + ".fake",
            "root_view_id": view_id,
            "previous_view_id": None,
            "app_id": self.app_id,
            "bot_id": self.bot_id,
            "app_installed_team_id": self.team_id,
        }
        view.setdefault("private_metadata", "")
        view.setdefault("callback_id", "")
        view.setdefault("external_id", "")
        self.views[view_id] = view
        return {"ok": True, "view": view}

    def _views_update(self, args: Json) -> Json:
        view_id = str(args.get("view_id") or "")
        external_id = str(args.get("external_id") or "")
        current = self.views.get(view_id) if view_id else None
        if current is None and external_id:
            current = next(
                (v for v in self.views.values() if v.get("external_id") == external_id), None
            )
        if current is None:
            raise _ApiError("not_found")
        if args.get("hash") and args["hash"] != current["hash"]:
            raise _ApiError("hash_conflict")
        view_args = self._view_arg(args)
        keep: Json = {
            k: current[k]
            for k in ("id", "team_id", "state", "root_view_id", "app_id", "bot_id")
            if k in current
        }
        current.clear()
        current.update({"private_metadata": "", "callback_id": "", "external_id": ""})
        current.update(view_args)
        current.update(keep)
        current["hash"] = self._next_ts() + ".fake"
        return {"ok": True, "view": current}

    # ------------------------------------------------------------------ method helpers

    def _next_ts(self) -> str:
        # Like Slack's: the current time, strictly increasing (look-ups filter on `oldest`).
        micros = max(next(self._ts_micros), time.time_ns() // 1000)
        self._ts_micros = itertools.count(micros + 100, 100)
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    def _channel_arg(self, args: Json) -> str:
        channel = str(args.get("channel") or "")
        if channel.startswith("#"):
            named = next((c for c in self.channels.values() if c["name"] == channel[1:]), None)
            if named is None:
                raise _ApiError("channel_not_found")
            return str(named["id"])
        if not channel:
            raise _ApiError("channel_not_found")
        return channel

    def _check_can_post(self, channel: str) -> None:
        """Answer as Slack does when the bot may not post in `channel`."""
        info = self.channels.get(channel)
        if info is None or info.get("is_member") or channel.startswith("D"):
            return
        if info.get("is_private"):
            raise _ApiError("channel_not_found")  # private channels are hidden from non-members
        if "chat:write.public" not in self.scopes:
            raise _ApiError("not_in_channel")

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

    def _content_args(self, args: Json, *, required: bool) -> tuple[str | None, list[Json] | None]:
        text = args.get("text")
        blocks = args.get("blocks")
        if blocks is not None:
            if not isinstance(blocks, list):
                raise _ApiError("invalid_blocks", unexpected=f"blocks is not a list: {blocks!r}")
            problems = block_problems(blocks, max_blocks=50)
            if problems:
                raise _ApiError("invalid_blocks", unexpected="; ".join(problems))
            size = len(json.dumps(blocks, ensure_ascii=False))
            if size > MAX_BLOCKS_JSON:
                raise _ApiError(
                    "msg_blocks_too_long", unexpected=f"blocks of {size:,} characters in all"
                )
        if required and not (text or blocks or args.get("attachments")):
            raise _ApiError("no_text")
        return (None if text is None else str(text)), blocks

    def _view_arg(self, args: Json) -> Json:
        view = args.get("view")
        if not isinstance(view, dict) or view.get("type") not in ("modal", "home"):
            raise _ApiError("invalid_arguments", unexpected=f"not a view: {view!r}")
        problems = block_problems(view.get("blocks", []), max_blocks=100)
        title = view.get("title", {}).get("text", "")
        if len(title) > 24:
            problems.append(f"modal title longer than 24 chars: {title!r}")
        if len(view.get("private_metadata", "")) > 3000:
            problems.append("private_metadata longer than 3000 chars")
        if problems:
            raise _ApiError("invalid_arguments", unexpected="; ".join(problems))
        return dict(view)

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

    # ------------------------------------------------------------------ response_url

    async def _response_url_post(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        target = self._response_urls.get(name)
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self.unexpected.append(f"response_url {name}: body is not a JSON object")
            return web.json_response({"ok": False, "error": "invalid_payload"}, status=400)
        self.responses.append(ResponseUrlPost(name, body, dict(request.headers), time.monotonic()))
        if target is None:
            self.unexpected.append(f"post to response_url {name} that was never handed out")
            return web.json_response({"ok": False, "error": "expired_url"}, status=404)
        blocks = body.get("blocks")
        if blocks is not None:
            problems = (
                block_problems(blocks, max_blocks=50)
                if isinstance(blocks, list)
                else [f"blocks is not a list: {blocks!r}"]
            )
            if not problems and len(json.dumps(blocks, ensure_ascii=False)) > MAX_BLOCKS_JSON:
                problems = ["msg_blocks_too_long"]
            if problems:
                # Checked as chat.postMessage checks them; a bot should never send these.
                self.unexpected.append(f"response_url {name}: " + "; ".join(problems))
                return web.json_response({"ok": False, "error": "invalid_blocks"}, status=400)
        target.uses += 1
        if target.uses > RESPONSE_URL_MAX_USES:
            self.unexpected.append(f"response_url {name} used more than 5 times")
            return web.json_response({"ok": False, "error": "used_url"}, status=404)
        self._apply_response(target, body)
        return web.json_response({"ok": True})

    def _apply_response(self, target: _ResponseUrl, body: Json) -> None:
        if target.channel is None:
            return
        original = (
            self.messages.get(target.channel, {}).get(target.message_ts)
            if target.message_ts
            else None
        )
        if original is None and target.message_ts:
            original = self.ephemeral_messages.get(target.channel, {}).get(target.message_ts)
        if body.get("delete_original") and original is not None:
            kept = (
                self.ephemeral_messages if original.get("subtype") == "ephemeral" else self.messages
            )
            del kept[target.channel][original["ts"]]
        elif body.get("replace_original") and original is not None:
            original["text"] = body.get("text", "")
            original["blocks"] = body.get("blocks", [])
            original["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        elif body.get("response_type") == "in_channel":
            self._store_message(
                target.channel,
                str(body.get("text", "")),
                list(body.get("blocks", [])),
                thread_ts=body.get("thread_ts"),
            )

    # ------------------------------------------------------------------ Socket Mode server

    async def _socket_mode(self, request: web.Request) -> web.StreamResponse:
        ticket = request.match_info["ticket"]
        if ticket not in self._tickets:
            self.unexpected.append(f"Socket Mode connect with unknown ticket {ticket}")
            return web.json_response({"ok": False, "error": "invalid_ticket"}, status=401)
        self._tickets.discard(ticket)  # tickets are single use, as with Slack
        ws = web.WebSocketResponse(autoping=True, timeout=1.0)
        await ws.prepare(request)
        sock = _Socket(ws, ticket)
        await ws.send_str(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": len(self._sockets) + 1,
                    "debug_info": {
                        "host": "fake-slack",
                        "build_number": 1,
                        "approximate_connection_time": 18060,
                    },
                    "connection_info": {"app_id": self.app_id},
                }
            )
        )
        self._sockets.append(sock)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_socket_text(msg.data)
                elif msg.type == WSMsgType.ERROR:
                    self.unexpected.append(f"Socket Mode error: {ws.exception()}")
        finally:
            self._sockets.remove(sock)
        return ws

    def _on_socket_text(self, data: str) -> None:
        try:
            message = json.loads(data)
        except json.JSONDecodeError:
            self.unexpected.append(f"Socket Mode client sent non-JSON: {data[:200]!r}")
            return
        envelope_id = message.get("envelope_id") if isinstance(message, dict) else None
        if not envelope_id:
            self.unexpected.append(f"Socket Mode client sent a non-ack: {data[:200]}")
            return
        self.acks.append(message)
        future = self._pending_acks.get(envelope_id)
        if future is None:
            self.unexpected.append(f"ack for unknown or already acked envelope {envelope_id}")
        elif not future.done():
            future.set_result(message)


# ---------------------------------------------------------------------- Block Kit checks


def _public(message: Json) -> Json:
    return {k: v for k, v in message.items() if k != "channel"}


def _text_of(obj: Any) -> str:
    return str(obj.get("text", "")) if isinstance(obj, dict) else ""


def _input_problems(where: str, block: Json) -> list[str]:
    """An input block as Slack checks it: label, hint, and a select's options and defaults."""
    problems = []
    label = _text_of(block.get("label"))
    if not label or len(label) > 2000:
        problems.append(f"{where}: label missing or longer than 2000")
    if len(_text_of(block.get("hint"))) > 2000:
        problems.append(f"{where}: hint longer than 2000")
    element = block.get("element")
    if not isinstance(element, dict) or "type" not in element:
        return [*problems, f"{where}: no element"]
    if element["type"] == "plain_text_input":
        if len(str(element.get("initial_value", ""))) > 3000:
            problems.append(f"{where}: initial_value longer than 3000")
    elif element["type"] in ("static_select", "multi_static_select"):
        options = element.get("options") or []
        if not 1 <= len(options) <= 100:
            problems.append(f"{where}: {len(options)} options (1 to 100)")
        for option in options:
            if len(_text_of(option.get("text"))) > 75 or len(str(option.get("value", ""))) > 150:
                problems.append(f"{where}: option text over 75 or value over 150")
        initial = element.get("initial_options") or []
        if "initial_option" in element:
            if element["type"] != "static_select":
                problems.append(f"{where}: initial_option on a {element['type']}")
            initial = [element["initial_option"]]
        elif initial and element["type"] != "multi_static_select":
            problems.append(f"{where}: initial_options on a {element['type']}")
        if any(o not in options for o in initial):
            problems.append(f"{where}: an initial option is not one of the options")
    return problems


def block_problems(blocks: list[Any], *, max_blocks: int) -> list[str]:
    """Block Kit limits a real Slack would reject (PLATFORM.md), as readable problems."""
    problems: list[str] = []
    if len(blocks) > max_blocks:
        problems.append(f"{len(blocks)} blocks (max {max_blocks})")
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or "type" not in block:
            problems.append(f"block {i} has no type: {block!r}")
            continue
        kind = block["type"]
        where = f"block {i} ({kind})"
        if len(str(block.get("block_id", ""))) > 255:
            problems.append(f"{where}: block_id longer than 255")
        if kind == "section":
            if len(_text_of(block.get("text"))) > 3000:
                problems.append(f"{where}: text longer than 3000")
            fields = block.get("fields", [])
            if len(fields) > 10 or any(len(_text_of(f)) > 2000 for f in fields):
                problems.append(f"{where}: more than 10 fields or a field over 2000")
        elif kind == "header" and len(_text_of(block.get("text"))) > 150:
            problems.append(f"{where}: header longer than 150")
        elif kind == "context" and len(block.get("elements", [])) > 10:
            problems.append(f"{where}: more than 10 elements")
        elif kind == "actions" and len(block.get("elements", [])) > 25:
            problems.append(f"{where}: more than 25 elements")
        elif kind == "input":
            problems += _input_problems(where, block)
        elements = list(block.get("elements", []))
        if isinstance(block.get("accessory"), dict):
            elements.append(block["accessory"])
        for element in elements:
            if not isinstance(element, dict) or element.get("type") != "button":
                continue
            if len(_text_of(element.get("text"))) > 75:
                problems.append(f"{where}: button text longer than 75")
            if len(str(element.get("value", ""))) > 2000:
                problems.append(f"{where}: button value longer than 2000")
            if len(str(element.get("action_id", ""))) > 255:
                problems.append(f"{where}: action_id longer than 255")
    return problems
