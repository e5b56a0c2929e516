"""Per Slack request: a correlation id for its logs, the time to its ack, and its outcome.

A Bolt middleware starts each request; Bolt's listener completion handler counts it once the
listener is done, with the outcome its answer showed (see `_NotingRespond`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slack_bolt.async_app import AsyncApp, AsyncBoltContext
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.listener.async_listener_completion_handler import AsyncListenerCompletionHandler

from app.core.errors import UserError
from app.ops import logs
from app.ops.metrics import Metrics

_REQUEST_KEY = "request_metrics"


@dataclass
class SlackRequest:
    """What is known of one Slack request while it is handled."""

    kind: str
    name: str
    started: float
    outcome: str = "ok"


def describe_request(body: Mapping[str, Any]) -> tuple[str, str]:
    """A Slack request's kind and name: `("command", "/deploy")`, `("action", "build_cancel")`."""
    if body.get("command"):
        return "command", str(body["command"])
    kind = str(body.get("type") or "unknown")
    if kind == "block_actions":
        actions = body.get("actions") or [{}]
        return "action", str(actions[0].get("action_id", "unknown"))
    if kind in ("view_submission", "view_closed"):
        return "view", str((body.get("view") or {}).get("callback_id") or "unknown")
    if kind in ("shortcut", "message_action"):
        return "shortcut", str(body.get("callback_id") or "unknown")
    if kind == "event_callback":
        return "event", str((body.get("event") or {}).get("type") or "unknown")
    return kind, "-"


class _TimedAck(AsyncAck):
    def __init__(self, on_first_ack: Callable[[], None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._on_first_ack: Callable[[], None] | None = on_first_ack

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._on_first_ack is not None:
            self._on_first_ack()
            self._on_first_ack = None
        return await super().__call__(*args, **kwargs)


class _NotingRespond(AsyncRespond):
    """`respond`, noting the outcome when it answers a failure (the inner one posts and counts).

    Listeners answer every failure through `handlers.errors.report_error`, which calls `respond`
    while the failure is being handled: that exception is the request's outcome.
    """

    def __init__(self, inner: AsyncRespond, record: SlackRequest) -> None:
        super().__init__(response_url=inner.response_url, proxy=inner.proxy, ssl=inner.ssl)
        self._inner = inner
        self._record = record

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        failure = sys.exc_info()[1]
        if failure is not None:
            self._record.outcome = "user_error" if isinstance(failure, UserError) else "error"
        return await self._inner(*args, **kwargs)


class _CountOnCompletion(AsyncListenerCompletionHandler):
    def __init__(self, inner: AsyncListenerCompletionHandler, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def handle(self, request: Any, response: Any) -> None:
        await self.inner.handle(request=request, response=response)
        record = request.context.get(_REQUEST_KEY)
        if isinstance(record, SlackRequest):
            if response is not None and response.status >= 500:
                record.outcome = "error"
            self.metrics.slack_requests.labels(record.kind, record.name, record.outcome).inc()


def observe_slack_requests(bolt: AsyncApp, metrics: Metrics) -> None:
    """Give each Slack request a correlation id, time its ack and count its outcome."""

    async def observe_request(
        context: AsyncBoltContext, body: dict[str, Any], next: Callable[[], Awaitable[None]]
    ) -> None:
        context["correlation_id"] = logs.new_correlation_id()
        kind, name = describe_request(body)
        record = SlackRequest(kind, name, time.monotonic())
        context[_REQUEST_KEY] = record

        def acked() -> None:
            metrics.ack_seconds.labels(kind, name).observe(time.monotonic() - record.started)

        context["ack"] = _TimedAck(acked)
        respond = context.respond
        if respond is not None:
            context["respond"] = _NotingRespond(respond, record)
        await next()

    bolt.use(observe_request)
    runner = bolt.listener_runner
    runner.listener_completion_handler = _CountOnCompletion(
        runner.listener_completion_handler, metrics
    )
