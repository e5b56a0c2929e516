"""An agent's side of /mcp for the tests, the benchmarks and the sandbox: the official SDK's
own client (ClientSession over Streamable HTTP) with a bearer token, and the policy lines that
declare an agent."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import mcp_types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


def token_sha256(token: str) -> str:
    """What the policy's `token_sha256` holds for `token`."""
    return hashlib.sha256(token.encode()).hexdigest()


@contextlib.asynccontextmanager
async def agent_session(base_url: str, token: str | None) -> AsyncIterator[ClientSession]:
    """The SDK's client, initialized, against `<base_url>/mcp` with `token` as bearer."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0)) as http,
        streamable_http_client(f"{base_url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call(session: ClientSession, name: str, **arguments: Any) -> types.CallToolResult:
    result = await session.call_tool(name, arguments)
    assert isinstance(result, types.CallToolResult)
    return result


def text_of(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def structured(session: ClientSession, name: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured content (the call must not be an error; its text says the same)."""
    result = await call(session, name, **arguments)
    if result.is_error or not isinstance(result.structured_content, dict):
        raise AssertionError(f"{name} failed: {text_of(result)}")
    if json.loads(text_of(result)) != result.structured_content:
        raise AssertionError(f"{name}: its text and its structured content differ")
    return result.structured_content
