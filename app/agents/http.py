"""`/mcp` on the bot's port: the bearer token checked before anything else, then the SDK's
Streamable HTTP transport, bridged from aiohttp to ASGI for that one route.

The SDK's session manager runs stateless (a fresh transport per request, JSON answers): every
tool call carries its own token and every state it needs is in Redis, so any replica behind a
load balancer can answer any request, and a restart loses no session. Its lifespan runs inside
the bot's (`McpEndpoint.running`), and waits in progress return at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from app.agents.gateway import Gateway
from app.agents.identity import Agent, bearer_token
from app.ops import logs
from app.ops.shutdown import StopBudget

if TYPE_CHECKING:
    from mcp.server import ServerRequestContext
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)

#: Where the authenticated agent travels in the ASGI scope's `state`, to the tool call.
AGENT_STATE = "bkchatops.agent"
#: Where an event set when the client hangs up travels, so that a wait it abandoned ends.
GONE_STATE = "bkchatops.gone"
#: Seconds between looks at whether the client of a request in progress is still there.
_PEER_CHECK = 0.2
#: Hop-by-hop headers aiohttp writes itself.
_HOP_HEADERS = frozenset({"connection", "transfer-encoding", "keep-alive"})


def agent_of_request(ctx: ServerRequestContext[Any, Any]) -> Agent | None:
    """The agent `McpEndpoint.handle` authenticated, read back from the request's scope."""
    scope = getattr(ctx.request, "scope", None)
    state = scope.get("state") if isinstance(scope, dict) else None
    agent = state.get(AGENT_STATE) if isinstance(state, dict) else None
    return agent if isinstance(agent, Agent) else None


def gone_of_request(ctx: ServerRequestContext[Any, Any]) -> asyncio.Event | None:
    """Set once the client of this request hung up (see `serve_asgi`)."""
    scope = getattr(ctx.request, "scope", None)
    state = scope.get("state") if isinstance(scope, dict) else None
    gone = state.get(GONE_STATE) if isinstance(state, dict) else None
    return gone if isinstance(gone, asyncio.Event) else None


def _jsonrpc_error(code: int, message: str, status: int) -> web.Response:
    reference = logs.current_correlation_id()
    return web.json_response(
        {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": code, "message": f"{message} (reference {reference})"},
        },
        status=status,
    )


class McpEndpoint:
    """The `/mcp` route and the SDK session manager behind it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._running = False
        #: Without agents in the policy nobody can authenticate: the SDK (half a second of
        #: imports) is not even loaded, and /mcp answers every request 401.
        self.manager: StreamableHTTPSessionManager | None = None
        if gateway.identities.declared:
            from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

            from app.agents.server import create_server

            self.manager = StreamableHTTPSessionManager(
                app=create_server(gateway, agent_of_request, gone_of=gone_of_request),
                stateless=True,
                json_response=True,
            )

    @contextlib.asynccontextmanager
    async def running(self, stopping: StopBudget) -> AsyncIterator[None]:
        """Run the session manager for the block's life; waits return when it ends.

        The manager's task group lives in a task of its own: anyio wants it left by the task
        that entered it, and the block may end in another (a test fixture's teardown).
        """
        manager = self.manager
        if manager is None:
            yield
            return
        self.gateway.changes.start()
        started, stop = asyncio.Event(), asyncio.Event()

        async def serve() -> None:
            async with manager.run():
                started.set()
                await stop.wait()

        task = asyncio.create_task(serve(), name="mcp-sessions")
        starting = asyncio.ensure_future(started.wait())
        await asyncio.wait([task, starting], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            starting.cancel()
            await task  # raises what stopped it
        self._running = True
        try:
            yield
        finally:
            self._running = False
            await self.gateway.changes.close()
            stop.set()
            _, late = await asyncio.wait([task], timeout=stopping.left())
            for pending in late:
                pending.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop_waits(self) -> None:
        """Let agents' waits return now (not reached), before the server stops taking requests."""
        await self.gateway.changes.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # Two Authorization headers are refused, whichever of them holds a token.
        given = request.headers.getall("Authorization", [])
        token = bearer_token(given[0]) if len(given) == 1 else None
        agent = self.gateway.identities.authenticate(token)
        if agent is None:
            # The token itself is never logged: only whether there was one.
            log.warning(
                "mcp request refused: %s", "no bearer token" if token is None else "unknown token"
            )
            return web.json_response(
                {"error": "unauthorized: send Authorization: Bearer <the agent's token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="buildkite-chatops"'},
            )
        if not self._running or self.manager is None:
            return web.json_response({"error": "the MCP server is not running"}, status=503)
        if request.method != "POST":
            # Stateless, with JSON answers: no session to end (DELETE) and no stream of
            # server-sent events to hold open (GET), which would tie up a connection forever.
            return web.json_response(
                {"error": "only POST: send one JSON-RPC request per POST"},
                status=405,
                headers={"Allow": "POST"},
            )
        body = await request.read()
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            return _jsonrpc_error(-32700, "The body is not JSON.", 400)
        if not isinstance(message, dict):
            return _jsonrpc_error(
                -32600,
                "Send one JSON-RPC request (an object) per POST: batches are not taken.",
                400,
            )
        return await serve_asgi(
            self.manager.handle_request,
            request,
            state={AGENT_STATE: agent, GONE_STATE: asyncio.Event()},
            # Checked here: the SDK never sees the token (nor could it log it).
            drop_headers=frozenset({b"authorization"}),
        )


async def serve_asgi(
    app: ASGIApp,
    request: web.Request,
    *,
    state: dict[str, Any],
    drop_headers: frozenset[bytes] = frozenset(),
) -> web.StreamResponse:
    """Serve one aiohttp request with an ASGI app, streaming its answer as it comes.

    The body is read first (within the web app's size limit); the app then sees a
    disconnect once it has answered, or as soon as the client hangs up (and `state`'s
    GONE_STATE event, if any, is set then).
    """
    body = await request.read()
    gone = state.get(GONE_STATE)
    hung_up = gone if isinstance(gone, asyncio.Event) else asyncio.Event()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host, port = (request.url.host or "localhost"), (request.url.port or 80)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode(),
        "query_string": request.query_string.encode(),
        "root_path": "",
        "headers": [
            (k.lower(), v) for k, v in request.raw_headers if k.lower() not in drop_headers
        ],
        "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
        "server": (host, port),
        "state": state,
    }
    delivered = False
    answered = asyncio.Event()
    response: web.StreamResponse | None = None

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        ended = [asyncio.ensure_future(e.wait()) for e in (answered, hung_up)]
        try:
            await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in ended:
                waiting.cancel()
        return {"type": "http.disconnect"}

    async def watch_peer() -> None:
        while not answered.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                hung_up.set()
                return
            await asyncio.sleep(_PEER_CHECK)

    async def send(message: Message) -> None:
        nonlocal response
        if hung_up.is_set():
            return  # nobody to answer: the answer is dropped, not an error
        if message["type"] == "http.response.start":
            response = web.StreamResponse(status=int(message["status"]))
            for key, value in message.get("headers", ()):
                name = key.decode("latin-1")
                if name.lower() not in _HOP_HEADERS:
                    response.headers.add(name, value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body" and response is not None:
            chunk = message.get("body", b"")
            try:
                if chunk:
                    await response.write(chunk)
                if not message.get("more_body", False):
                    await response.write_eof()
                    answered.set()
            except ConnectionError:  # it hung up between the look and the write
                hung_up.set()

    watcher = asyncio.create_task(watch_peer(), name="mcp-peer")
    try:
        await app(scope, receive, send)
    finally:
        answered.set()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if response is None:
        return web.json_response({"error": "no answer"}, status=500)
    return response
