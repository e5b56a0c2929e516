"""A fake Slack: a real aiohttp server that answers the Web API, response_urls and Socket Mode.

It is the sandbox's and the tests' simulator of Slack, shipped in the package.

Point `AsyncWebClient(base_url=fake.api_url)` at it, drive the bot with `socket_send()` or
signed HTTP requests, then assert on `calls`, `messages` and `responses`. Anything the fake
does not expect lands in `unexpected`, which tests assert is empty.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from app.simulators.serving import LoopbackServer
from app.simulators.slack_records import (
    APP_TOKEN_METHODS,
    BOOL_FIELDS,
    JSON_FIELDS,
    MANIFEST_SCOPES,
    MAX_BLOCKS_JSON,
    PERMALINK_BASE,
    RESPONSE_URL_MAX_USES,
    Json,
    RecordedCall,
    ResponseUrlPost,
    _ApiError,
    _Fault,
    _ResponseUrl,
    block_problems,
)
from app.simulators.slack_socket import SlackSocketMode

# What tests, benchmarks and the sandbox import from here.
__all__ = [
    "APP_TOKEN_METHODS",
    "BOOL_FIELDS",
    "JSON_FIELDS",
    "MANIFEST_SCOPES",
    "MAX_BLOCKS_JSON",
    "PERMALINK_BASE",
    "RESPONSE_URL_MAX_USES",
    "FakeSlack",
    "Json",
    "RecordedCall",
    "ResponseUrlPost",
    "block_problems",
]


class FakeSlack(SlackSocketMode, LoopbackServer):
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

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Serve on a free port of 127.0.0.1."""
        app = web.Application(middlewares=[self._guard])
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{name}", self._response_url_post)
        app.router.add_get("/socket-mode/{ticket}", self._socket_mode)
        app.router.add_route("*", "/{tail:.*}", self._unknown_path)
        self._base_url = f"http://127.0.0.1:{await self._serve_app(app)}"

    async def stop(self) -> None:
        """Close every Socket Mode connection, fail pending `socket_send`s and stop serving."""
        for future in self._pending_acks.values():
            if not future.done():
                future.cancel()
        for sock in list(self._sockets):
            await sock.ws.close(code=1001, message=b"fake slack stopping")
        await self._stop_app()

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
