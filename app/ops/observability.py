"""Per Slack request: a correlation id for its logs, the time to its ack, and its outcome.

`SlackRequestObserver.start` opens a request's record as the app's dispatch begins;
`SlackRequest.answered` times the ack once the dispatch returns Slack's answer, and the
listener's error wrapper (`handlers.errors.answer_errors`) counts the outcome once the listener
is done, through `request_finished`. Nothing here runs a label look-up before the ack.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from slack_bolt.request.async_request import AsyncBoltRequest

from app.ops import logs
from app.ops.metrics import Metrics

#: The request the current task handles: a listener's task inherits it from the dispatch.
_current: ContextVar[SlackRequest | None] = ContextVar("slack_request", default=None)


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


class SlackRequest:
    """One Slack request while it is handled: when it arrived, and what to count it under."""

    __slots__ = ("_body", "_labels", "_metrics", "started")

    def __init__(self, metrics: Metrics, body: Mapping[str, Any], started: float) -> None:
        self._metrics = metrics
        self._body = body
        self._labels: tuple[str, str] | None = None
        self.started = started

    @property
    def labels(self) -> tuple[str, str]:
        """Its kind and name, read from the body when first needed (after the ack)."""
        if self._labels is None:
            self._labels = describe_request(self._body)
        return self._labels

    def answered(self, request: AsyncBoltRequest) -> None:
        """The dispatch returned Slack's answer: time it, if a listener or middleware acked."""
        if request.context.ack is not None and request.context.ack.response is not None:
            seconds = time.monotonic() - self.started
            self._metrics.ack_seconds.labels(*self.labels).observe(seconds)

    def finished(self, outcome: str) -> None:
        """The listener is done: count the request with its outcome (ok, user_error, error)."""
        self._metrics.slack_requests.labels(*self.labels, outcome).inc()


class SlackRequestObserver:
    """Opens each Slack request's record, at the start of the app's dispatch (both modes)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def start(self, request: AsyncBoltRequest) -> SlackRequest:
        """A record for `request`, current in this task from now, and a correlation id for its
        logs (a fresh one, unless the HTTP route gave it one already)."""
        if not request.context.get("correlation_id"):
            request.context["correlation_id"] = logs.new_correlation_id()
        record = SlackRequest(self.metrics, request.body, time.monotonic())
        _current.set(record)
        return record


def request_finished(outcome: str) -> None:
    """Count the Slack request the current listener handled (nothing outside a dispatch)."""
    record = _current.get()
    if record is not None:
        record.finished(outcome)
