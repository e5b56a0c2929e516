"""The aiohttp-to-ASGI bridge of /mcp: the request as ASGI sees it (method, path, query, body,
headers minus the dropped ones, the state), and the answer streamed chunk by chunk as the app
sends it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from app.agents.http import serve_asgi


@contextlib.asynccontextmanager
async def serving(app: Any, **kwargs: Any) -> AsyncIterator[str]:
    async def route(request: web.Request) -> web.StreamResponse:
        return await serve_asgi(app, request, **kwargs)

    web_app = web.Application()
    web_app.router.add_route("*", "/mcp", route)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await runner.cleanup()


async def test_the_request_reaches_the_app_as_asgi_describes_it() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["scope"] = scope
        seen["first"] = await receive()
        await send(
            {"type": "http.response.start", "status": 202, "headers": [(b"x-answer", b"yes")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})
        seen["after"] = await asyncio.wait_for(receive(), 5)  # a disconnect once answered

    async with (
        serving(app, state={"who": "captain"}, drop_headers=frozenset({b"authorization"})) as url,
        aiohttp.ClientSession() as http,
        http.post(
            url + "?a=1",
            data=b'{"jsonrpc": "2.0"}',
            headers={"Authorization": "Bearer secret", "X-Kept": "1"},
        ) as resp,
    ):
        assert resp.status == 202 and resp.headers["X-Answer"] == "yes"
        assert await resp.read() == b"ok"
    scope = seen["scope"]
    assert (scope["type"], scope["method"], scope["path"]) == ("http", "POST", "/mcp")
    assert scope["query_string"] == b"a=1" and scope["state"] == {"who": "captain"}
    headers = dict(scope["headers"])
    assert b"authorization" not in headers and headers[b"x-kept"] == b"1"
    assert seen["first"] == {
        "type": "http.request",
        "body": b'{"jsonrpc": "2.0"}',
        "more_body": False,
    }
    assert seen["after"] == {"type": "http.disconnect"}


async def test_an_answer_is_streamed_as_the_app_sends_it() -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await release.wait()  # the first event must arrive before the app goes on
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": False})

    async with (
        serving(app, state={}) as url,
        aiohttp.ClientSession() as http,
        http.post(url, data=b"{}") as resp,
    ):
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert first == b"data: one\n\n"
        release.set()
        assert await resp.content.read() == b"data: two\n\n"


async def test_an_app_that_answers_nothing_gets_a_500() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async with (
        serving(app, state={}) as url,
        aiohttp.ClientSession() as http,
        http.post(url, data=b"{}") as resp,
    ):
        assert resp.status == 500
