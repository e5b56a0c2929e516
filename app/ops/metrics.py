"""Prometheus metrics of one bot, and the hooks that count them on the clients it uses.

Each bot has its own `CollectorRegistry`, so several bots can run in one process (the tests do).
Counting happens at the edges: httpx event hooks for Buildkite, a slack_sdk retry handler
(consulted on every answer) for the Web API, redis-py's retry policy for Redis errors, and a Bolt
middleware for Slack requests (app/ops/observability.py), so the code in between knows nothing of
metrics, but for a line each in the tracker (transitions, poll cycles) and the webhook route.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler


class PollOutcome(Protocol):
    """What a poll cycle reports (app.tracking.poller.PollReport), as far as it is counted."""

    @property
    def requests(self) -> int: ...
    @property
    def skipped(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def backoff(self) -> float: ...
    @property
    def backed_off(self) -> str: ...


T = TypeVar("T")

#: Slack takes 3 s without an answer as a failure, so the buckets are dense below that.
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)
#: A path segment after one of these names is an id, replaced by the placeholder.
_ID_AFTER = {
    "organizations": "{org}",
    "pipelines": "{pipeline}",
    "builds": "{number}",
    "jobs": "{job}",
    "agents": "{agent}",
}
_EVENT = re.compile(r"^[a-z_]{1,30}\.[a-z_]{1,30}$")


class Metrics:
    """Every metric the bot exports, registered in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.slack_requests = Counter(
            "bkchatops_slack_requests",
            "Slack commands, button clicks and other requests handled, by outcome "
            "(ok, user_error: answered with an explanation, error: unexpected failure)",
            ["kind", "name", "outcome"],
            registry=r,
        )
        self.ack_seconds = Histogram(
            "bkchatops_slack_ack_seconds",
            "Time from a Slack request reaching the bot to its acknowledgement",
            ["kind", "name"],
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.slack_calls = Counter(
            "bkchatops_slack_api_calls",
            "Slack Web API calls (each attempt) and response_url posts, by method and status",
            ["method", "status"],
            registry=r,
        )
        self.buildkite_requests = Counter(
            "bkchatops_buildkite_requests",
            "Buildkite REST API requests (each attempt), by templated endpoint and HTTP status",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.buildkite_rate_limit_remaining = Gauge(
            "bkchatops_buildkite_rate_limit_remaining",
            "RateLimit-Remaining of Buildkite's latest answer",
            registry=r,
        )
        self.buildkite_rate_limit_scope_remaining = Gauge(
            "bkchatops_buildkite_rate_limit_scope_remaining",
            "Requests left in each Buildkite rate-limit scope at its latest report "
            "(organization: RateLimit-Remaining; user: RateLimit-User-Remaining)",
            ["scope"],
            registry=r,
        )
        self.build_transitions = Counter(
            "bkchatops_build_transitions",
            "Build state changes written to Slack, by the state reached",
            ["state"],
            registry=r,
        )
        self.builds_pending = Gauge(
            "bkchatops_builds_pending",
            "Builds being followed (read from the store when scraped)",
            registry=r,
        )
        self.webhooks = Counter(
            "bkchatops_webhooks",
            "Buildkite webhooks received, by event and result",
            ["event", "result"],
            registry=r,
        )
        self.poll_cycles = Counter(
            "bkchatops_poll_cycles",
            "Poll cycles, by outcome (ok, idle: nothing pending, skipped: another process "
            "polled, waiting: backing off, failed)",
            ["outcome"],
            registry=r,
        )
        self.poll_backoff_seconds = Gauge(
            "bkchatops_poll_backoff_seconds",
            "Seconds before Buildkite is polled again while the poller backs off (0: polling)",
            registry=r,
        )
        self.poll_backoffs = Counter(
            "bkchatops_poll_backoffs",
            "Poll cycles that made the poller back off, by reason (rate_limit_low, "
            "rate_limited, server_error, unavailable, error)",
            ["reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "bkchatops_redis_errors",
            "Redis commands that failed (after redis-py's retries), by error",
            ["error"],
            registry=r,
        )
        self.agent_calls = Counter(
            "bkchatops_agent_calls",
            "Agents' MCP tool calls, by tool and outcome (started, awaiting_approval, answered, "
            "refused, repeated, invalid, failed)",
            ["tool", "outcome"],
            registry=r,
        )
        self.agent_waits = Gauge(
            "bkchatops_agent_waits",
            "Agents' wait_for_build and wait_for_request calls in progress in this process",
            registry=r,
        )

    # -- counting, for the few places that count by hand ----------------------------------

    def build_transition(self, old: str, new: str) -> None:
        if old != new:  # a channel joining a build replays its phase: not a change
            self.build_transitions.labels(new).inc()

    def poll_cycle(self, report: PollOutcome | None) -> None:
        """Count a poll cycle from its report; None when it failed."""
        if report is None or report.failed:
            outcome = "failed"
        elif report.skipped:
            outcome = "waiting" if report.backoff else "skipped"
        elif not report.requests:
            outcome = "idle"
        else:
            outcome = "ok"
        self.poll_cycles.labels(outcome).inc()
        if report is not None:
            self.poll_backoff_seconds.set(report.backoff)
            if report.backed_off:
                self.poll_backoffs.labels(report.backed_off).inc()

    def webhook(self, event: str | None, result: str) -> None:
        name = event if event and _EVENT.match(event) else "unknown"
        self.webhooks.labels(name, result).inc()


#: Metrics counted nowhere; the default of objects not wired by `app.main`.
UNWIRED = Metrics(CollectorRegistry(auto_describe=False))


# -- Buildkite: httpx event hooks ----------------------------------------------------------


def endpoint_template(path: str, base_path: str = "") -> str:
    """`/v2/organizations/acme/pipelines/web/builds/12` -> `/organizations/{org}/...{number}`."""
    if base_path and path.startswith(base_path.rstrip("/") + "/"):
        path = path[len(base_path.rstrip("/")) :]
    segments = [s for s in path.split("/") if s]
    out = []
    for i, segment in enumerate(segments):
        previous = segments[i - 1] if i else ""
        out.append(_ID_AFTER.get(previous, segment) if previous in _ID_AFTER else segment)
    return "/" + "/".join(out)


def count_buildkite_requests(http: httpx.AsyncClient, metrics: Metrics, base_url: str) -> None:
    """Count every answer the shared httpx client gets from Buildkite."""
    base = httpx.URL(base_url)

    async def on_response(response: httpx.Response) -> None:
        url = response.request.url
        if url.host == base.host and url.port == base.port:
            endpoint = endpoint_template(url.path, base.path)
        else:
            endpoint = "other"
        status = str(response.status_code)
        metrics.buildkite_requests.labels(response.request.method, endpoint, status).inc()
        remaining = response.headers.get("RateLimit-Remaining")
        if remaining is not None and remaining.isascii() and remaining.isdigit():
            metrics.buildkite_rate_limit_remaining.set(int(remaining))
        for scope, header in (
            ("organization", "RateLimit-Remaining"),
            ("user", "RateLimit-User-Remaining"),
        ):
            value = response.headers.get(header)
            if value is not None and value.isascii() and value.isdigit():
                metrics.buildkite_rate_limit_scope_remaining.labels(scope).set(int(value))

    http.event_hooks["response"].append(on_response)


# -- Slack Web API: a retry handler that never retries, consulted on every answer ------------


class CountSlackCalls(AsyncRetryHandler):
    """Counts each Web API attempt by method and status; never asks for a retry itself."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(max_retry_count=0)
        self.metrics = metrics

    async def can_retry_async(
        self,
        *,
        state: Any,
        request: Any,
        response: Any = None,
        error: Exception | None = None,
    ) -> bool:
        method = str(request.url).rstrip("/").rsplit("/", 1)[-1]
        self.metrics.slack_calls.labels(method, slack_status(response, error)).inc()
        return False


def slack_status(response: Any, error: Exception | None) -> str:
    if response is None:
        return "connection_error" if error is not None else "unknown"
    body = response.body if isinstance(response.body, Mapping) else {}
    if response.status_code == 200 and body.get("ok"):
        return "ok"
    if response.status_code == 429:
        return "ratelimited"
    if response.status_code == 200 and body.get("error"):
        return str(body["error"])[:40]
    return f"http_{response.status_code}"


# -- Redis: redis-py's own retry policy, counting commands that finally fail -----------------

_redis_depth: ContextVar[int] = ContextVar("redis_retry_depth", default=0)


class CountingRetry(Retry):
    """redis-py's retry policy for the store's client, counting the commands that finally fail.

    Only what runs no command of ours is retried (once, on a new connection, after 0.1 s):
    connecting, and the health-check PING that redis-py sends before using a connection idle
    for a while (see `HEALTH_CHECK_INTERVAL`). After a Redis restart or failover every pooled
    connection is dead; the PING finds that out and reconnects, so the command then goes to
    the live server. A command itself is never sent twice: a connection lost after Redis ran
    it would run it again, and a guard (a request claim, an approval, a once-marker) would
    then answer its own first caller "already done".

    Connections deep-copy their retry policy; this one is shared on purpose (it keeps no state
    per connection). A connect retried inside a command's retry is counted once, as the command.
    """

    def __init__(self, metrics: Metrics, retries: int = 1) -> None:
        super().__init__(ConstantBackoff(0.1), retries, supported_errors=(RedisConnectionError,))
        self.metrics = metrics

    def __deepcopy__(self, memo: dict[int, Any]) -> CountingRetry:
        return self

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> T:
        depth = _redis_depth.get()
        token = _redis_depth.set(depth + 1)
        try:
            if not _runs_no_command(do):
                return await _once(do, fail, kwargs.get("with_failure_count", False))
            return await super().call_with_retry(do, fail, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if depth == 0:
                self.metrics.redis_errors.labels(type(exc).__name__).inc()
            raise
        finally:
            _redis_depth.reset(token)


#: Seconds a pooled Redis connection may sit unused before redis-py PINGs it before use.
HEALTH_CHECK_INTERVAL = 1


def _runs_no_command(do: Callable[[], Awaitable[Any]]) -> bool:
    """True for redis-py's connect and health-check PING calls (safe to repeat)."""
    # The one place that reads redis-py's internals: a connection hands the same retry policy
    # its connect, its health-check PING and every command, with no public way to tell them
    # apart (no per-call `is_retryable`, no separate connect policy, as of redis-py 8.1). The
    # callable's name is the only sign; should it change, commands are still never repeated
    # (only connects lose their one retry), and tests/test_redis_topologies.py fails.
    name = getattr(do, "__qualname__", "")
    return "connect" in name or name.endswith("_send_ping")


async def _once(
    do: Callable[[], Awaitable[T]], fail: Callable[..., Any], with_failure_count: bool
) -> T:
    """Run a command once; on a connection error let redis-py drop the connection, then raise."""
    try:
        return await do()
    except RedisConnectionError as error:
        outcome = fail(error, 1) if with_failure_count else fail(error)
        if inspect.isawaitable(outcome):
            await outcome
        raise
