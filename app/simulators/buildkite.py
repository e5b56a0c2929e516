"""A fake Buildkite REST API v2 on a real aiohttp server, for tests, benchmarks and the sandbox.

It is the sandbox's and the tests' simulator of Buildkite, shipped in the package.

It keeps pipelines, builds, jobs and agents in memory and answers like Buildkite does (bodies,
status codes, ``Link`` pagination, ``RateLimit-*`` headers, token scopes). It records every
request, injects faults on demand, and fails LOUDLY on anything it does not expect: such a request
gets a 599 and lands in ``unexpected``, which every test fixture asserts is empty.

    async with FakeBuildkite() as bk:
        bk.add_pipeline("deploy-prod")
        client = BuildkiteClient(bk.token, bk.org, base_url=bk.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import traceback
from typing import Any, Literal
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from app.simulators.buildkite_api import BuildkiteApi
from app.simulators.buildkite_records import (
    _META_PARAM_RE,
    ALL_SCOPES,
    API_URL,
    BUILD_STATES,
    CANCELABLE_STATES,
    FINISHED_STATES,
    JSON,
    RETRYABLE_JOB_STATES,
    TERMINAL_STATES,
    UNAUTHORIZED_MESSAGE,
    UNEXPECTED_STATUS,
    UNFINISHED_JOB_STATES,
    RecordedRequest,
    _Call,
    _Fault,
    _Reply,
    _Route,
    _Unexpected,
    sign_webhook,
    token_webhook_headers,
    webhook_event_for,
)
from app.simulators.serving import LoopbackServer

# What tests, benchmarks and the sandbox import from here.
__all__ = [
    "ALL_SCOPES",
    "API_URL",
    "BUILD_STATES",
    "CANCELABLE_STATES",
    "FINISHED_STATES",
    "JSON",
    "RETRYABLE_JOB_STATES",
    "TERMINAL_STATES",
    "UNAUTHORIZED_MESSAGE",
    "UNEXPECTED_STATUS",
    "UNFINISHED_JOB_STATES",
    "FakeBuildkite",
    "RecordedRequest",
    "sign_webhook",
    "token_webhook_headers",
    "webhook_event_for",
]


class FakeBuildkite(BuildkiteApi, LoopbackServer):
    """An in-memory Buildkite organization served over real HTTP on a free loopback port."""

    # Lifecycle

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.port = await self._serve_app(app)

    async def stop(self) -> None:
        """Stop serving; requests still waiting on a delay are answered at once."""
        self._stopping.set()
        await self._stop_app()

    # Fault injection

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        body: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (a JSON message, or ``body``)."""
        self._faults.append(
            _Fault("fail", n, path_contains, method and method.upper(), status=status, body=body)
        )

    def rate_limit_next(
        self,
        n: int = 1,
        reset: int = 1,
        *,
        path_contains: str | None = None,
        scope: Literal["rest", "rest_user"] = "rest",
    ) -> None:
        """Answer the next ``n`` requests with Buildkite's 429 for ``scope`` (the organization's
        limit, or the token user's), whose body and reset header say ``reset`` seconds."""
        self._faults.append(_Fault("rate_limit", n, path_contains, reset=reset, scope=scope))

    def delay_next(
        self,
        n: int,
        seconds: float,
        path_contains: str | None = None,
        *,
        method: str | None = None,
    ) -> None:
        """Hold the next ``n`` matching requests for ``seconds`` before handling them."""
        self._faults.append(
            _Fault("delay", n, path_contains, method and method.upper(), seconds=seconds)
        )

    def drop_response_next(
        self,
        n: int = 1,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        how: Literal["cut", "delay", "fail"] = "cut",
        seconds: float = 60.0,
        status: int = 502,
    ) -> None:
        """Handle the next ``n`` matching requests, then lose the response.

        ``how="cut"`` closes the connection unanswered; ``"delay"`` holds the answer ``seconds``
        (past the client's timeout); ``"fail"`` answers ``status`` instead (a proxy's 5xx).
        Either way the change has happened on the server.
        """
        fault = _Fault(
            "drop", n, path_contains, method and method.upper(), seconds=seconds, status=status
        )
        fault.how = how
        self._faults.append(fault)

    def drop_after_create_next(
        self, n: int = 1, *, how: Literal["cut", "delay"] = "cut", seconds: float = 60.0
    ) -> None:
        """Create the next ``n`` builds, then lose the HTTP responses (see drop_response_next)."""
        self.drop_response_next(n, "/builds", method="POST", how=how, seconds=seconds)

    def fail_after_create_next(self, n: int = 1, status: int = 502) -> None:
        """Create the next ``n`` builds, then answer ``status`` (a proxy's 5xx, say)."""
        fault = _Fault("drop", n, "/builds", "POST", status=status)
        fault.how = "fail"
        self._faults.append(fault)

    def answer_late_next(
        self,
        seconds: float,
        path_contains: str,
        *,
        method: str,
        visible_after: float | None = None,
        n: int = 1,
    ) -> None:
        """Take ``seconds`` to answer the next ``n`` matching requests, as a slow Buildkite does.

        The work is done (a build created, say, and listed from then on) ``visible_after``
        seconds in (by default: as it answers), whether or not the client is still waiting.
        """
        visible = seconds if visible_after is None else min(visible_after, seconds)
        if visible > 0:
            self.delay_next(n, visible, path_contains, method=method)
        if seconds > visible:
            self.drop_response_next(
                n, path_contains, method=method, how="delay", seconds=seconds - visible
            )

    def clear_faults(self) -> None:
        self._faults.clear()

    def faults_left(self, kind: Literal["fail", "rate_limit", "delay", "drop"]) -> int:
        """How many injected faults of this kind no request has met yet."""
        return sum(fault.remaining for fault in self._faults if fault.kind == kind)

    # Recorded requests

    def requests_to(
        self, method: str | None = None, path_prefix: str = ""
    ) -> list[RecordedRequest]:
        """Recorded requests by method and path prefix (with or without the ``/v2``)."""
        return [
            request
            for request in self.requests
            if (method is None or request.method == method.upper())
            and (request.path.startswith(path_prefix) or request.api_path.startswith(path_prefix))
        ]

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    def clear_requests(self) -> None:
        self.requests.clear()

    # Dispatch

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._serve(request)
        finally:
            self.in_flight -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        method = request.method
        path = request.rel_url.raw_path
        query = list(request.rel_url.query.items())
        description = f"{method} {request.rel_url.raw_path_qs}"
        body: Any = None
        problem = None
        if raw:
            if not request.content_type.startswith("application/json"):
                problem = f"body sent as {request.content_type}, not application/json"
            else:
                try:
                    body = json.loads(raw)
                except ValueError:
                    problem = "body is not valid JSON"
        self.requests.append(
            RecordedRequest(method, path, query, CIMultiDict(request.headers), raw, body)
        )
        count, reset = self._count_request()

        route, args = self._route(method, path)
        response: web.StreamResponse
        try:
            if route is None or problem is not None:
                raise _Unexpected(problem or "no such endpoint")
            response = await self._answer(request, route, args, body, count, reset)
        except _Unexpected as exc:
            response = self._unexpected(f"{description}: {exc}")
        except Exception:
            response = self._unexpected(
                f"{description}: the fake crashed\n{traceback.format_exc()}"
            )
        if response.status != 429:  # a 429 carries its own numbers
            response.headers.update(self._rate_limit_headers(count, reset))
        # Only a request that did its work can lose its answer.
        if response.status < 300 and (drop := self._take("drop", method, path)):
            if drop.how == "cut":
                if request.transport is not None:
                    request.transport.close()
            elif drop.how == "fail":
                response = web.json_response({"message": "Bad Gateway"}, status=drop.status)
            else:
                await self._pause(drop.seconds)
        return response

    async def _answer(
        self,
        request: web.Request,
        route: _Route,
        args: dict[str, str],
        body: Any,
        count: int,
        reset: int,
    ) -> web.StreamResponse:
        method, path = request.method, request.rel_url.raw_path
        if self.latency:
            await self._pause(self.latency)
        if delay := self._take("delay", method, path):
            await self._pause(delay.seconds)
        if limited := self._take("rate_limit", method, path):
            return self._too_many_requests(limited.scope, None, limited.reset)
        if failure := self._take("fail", method, path):
            if failure.body is not None:
                return web.Response(status=failure.status, text=failure.body)
            return web.json_response({"message": "Internal Server Error"}, status=failure.status)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"message": UNAUTHORIZED_MESSAGE}, status=401)
        if count > self.rate_limit:
            return self._too_many_requests("rest", count, reset)
        if count > self.user_rate_limit:
            return self._too_many_requests("rest_user", count, reset)
        if route.scope is not None and route.scope not in self.scopes:
            message = f"Your access token doesn't have the {route.scope} scope"
            return web.json_response({"message": message}, status=403)
        for key in request.rel_url.query:
            meta_data_filter = route.meta_data_filters and _META_PARAM_RE.fullmatch(key)
            if key not in route.query and not meta_data_filter:
                raise _Unexpected(f"unknown query parameter {key!r}")
        call = _Call(request, args, request.rel_url.query, body)
        try:
            return route.handler(call)
        except _Reply as reply:
            return reply.response

    def _route(self, method: str, path: str) -> tuple[_Route | None, dict[str, str]]:
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match and route.method == method:
                return route, {key: unquote(value) for key, value in match.groupdict().items()}
        return None, {}

    def _unexpected(self, description: str) -> web.Response:
        self.unexpected.append(description)
        return web.json_response(
            {"message": f"unexpected request to FakeBuildkite: {description}"},
            status=UNEXPECTED_STATUS,
        )

    def _take(self, kind: str, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.kind == kind and fault.matches(method, path):
                fault.remaining -= 1
                return fault
        return None

    async def _pause(self, seconds: float) -> None:
        # Wakes early when the fake stops, so a test never waits on a held request.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _count_request(self) -> tuple[int, int]:
        """This request's number in the current 60 s window, and the seconds left in it (one
        token is one user, so both scopes count the same requests)."""
        elapsed = time.monotonic() - self._window_started
        if elapsed >= 60:
            self._window_started, self._window_count, elapsed = time.monotonic(), 0, 0.0
        self._window_count += 1
        return self._window_count, max(math.ceil(60 - elapsed), 1)

    def _rate_limit_headers(self, count: int, reset: int) -> dict[str, str]:
        return {
            "RateLimit-Scope": "organization",
            "RateLimit-Limit": str(self.rate_limit),
            "RateLimit-Remaining": str(max(self.rate_limit - count, 0)),
            "RateLimit-Reset": str(reset),
            "RateLimit-User-Limit": str(self.user_rate_limit),
            "RateLimit-User-Remaining": str(max(self.user_rate_limit - count, 0)),
            "RateLimit-User-Reset": str(reset),
        }

    def _too_many_requests(
        self, scope: Literal["rest", "rest_user"], count: int | None, reset: int
    ) -> web.Response:
        """Buildkite's 429: the body names the scope exceeded; its headers show it used up."""
        limit = self.rate_limit if scope == "rest" else self.user_rate_limit
        body = {
            "message": (
                "You have exceeded your API rate limit. "
                f"Please wait {reset} seconds before making more requests."
            ),
            "scope": scope,
            "limit": limit,
            "current": count if count is not None else limit + 1,
            "reset": reset,
        }
        response = web.json_response(body, status=429)
        headers = self._rate_limit_headers(self._window_count, reset)
        # The scope exceeded shows nothing left, even for an injected 429.
        headers["RateLimit-Remaining" if scope == "rest" else "RateLimit-User-Remaining"] = "0"
        response.headers.update(headers)
        return response
