"""The fake Slack's Socket Mode: the WebSocket it serves and how tests send the bot envelopes.
Part of the sandbox's and the tests' simulator of Slack.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from typing import Any

from aiohttp import WSMsgType, web

from app.simulators.slack_records import (
    Json,
    _Socket,
)
from app.simulators.slack_state import WAIT_TIMEOUT
from app.simulators.slack_web_api import SlackWebApi


class SlackSocketMode(SlackWebApi):
    """The fake's workspace, with its Web API and Socket Mode."""

    # ------------------------------------------------------------------ Socket Mode driver

    @property
    def socket_connected(self) -> bool:
        return any(not s.ws.closed for s in self._sockets)

    async def wait_socket_connected(self, timeout: float = WAIT_TIMEOUT) -> None:  # noqa: ASYNC109
        """Wait until a Socket Mode client is connected and has been sent `hello`."""
        await self.wait_for(lambda: self.socket_connected, timeout=timeout)

    async def socket_send(
        self,
        payload_type: str,
        payload: Mapping[str, Any],
        *,
        timeout: float = WAIT_TIMEOUT,  # noqa: ASYNC109
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
