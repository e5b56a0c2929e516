"""The bot's HTTP surface: Slack's events endpoint, Buildkite's webhook, health and metrics.

In Socket Mode the Slack route is absent (Slack talks over the websocket); the others stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp, AsyncBoltRequest
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.response import BoltResponse

from app.core.services import Services
from app.ops import logs
from app.ops.checks import Readiness
from app.ops.metrics import Metrics
from app.slack.verification import (
    VERIFIED,
    SlackPayloadError,
    SlackVerificationError,
    read_slack_body,
    verify_slack_request,
)
from buildkite.webhooks import (
    WebhookPayloadError,
    WebhookVerificationError,
    buildkite_hosts,
    implausible_build,
    parse_webhook,
    verify_webhook,
)

log = logging.getLogger(__name__)

SERVICES_KEY = web.AppKey("services", Services)
METRICS_KEY = web.AppKey("metrics", Metrics)
READINESS_KEY = web.AppKey("readiness", Readiness)
MAX_BODY = 1024 * 1024


def create_web_app(
    services: Services,
    bolt: AsyncApp | None,
    *,
    metrics: Metrics,
    readiness: Readiness,
    mcp: Handler | None = None,
) -> web.Application:
    """Routes: POST /slack/events (HTTP mode only), POST /buildkite/webhook, GET /healthz,
    /readyz and /metrics, and /mcp for agents (app.agents.http, in both modes)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[correlate])
    app[SERVICES_KEY] = services
    app[METRICS_KEY] = metrics
    app[READINESS_KEY] = readiness
    if bolt is not None:
        app.router.add_post("/slack/events", slack_events_route(bolt))
    app.router.add_post("/buildkite/webhook", buildkite_webhook)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    if mcp is not None:
        app.router.add_route("*", "/mcp", mcp)
    return app


@web.middleware
async def correlate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A fresh correlation id for every request's log lines (a connection serves several)."""
    logs.new_correlation_id()
    return await handler(request)


def slack_events_route(bolt: AsyncApp) -> Handler:
    """POST /slack/events: Slack's signature checked first, then the request handed to Bolt.

    Refused requests are answered here, unread: 401 when not signed by Slack within 5 minutes,
    400 when signed but not a body Slack sends. Neither reaches Bolt, so nothing in the body (its
    response_url above all) is ever acted on or logged. Bolt's own check is off over HTTP (it
    would only repeat this one); `OnlyVerified` holds off any request that reaches Bolt some
    other way.
    """

    async def slack_events(request: web.Request) -> web.StreamResponse:
        services = request.app[SERVICES_KEY]
        body = await request.read()
        secret = services.settings.slack_signing_secret.get_secret_value()
        try:
            verify_slack_request(request.headers, body, secret, now=time.time())
        except SlackVerificationError as exc:
            log.warning("slack request refused (%d bytes): %s", len(body), exc)
            return web.json_response({"error": "unverified"}, status=401)
        try:
            text = read_slack_body(request.headers, body)
            bolt_request = AsyncBoltRequest(
                body=text,
                query=request.query_string,
                headers=request.headers,  # type: ignore[arg-type]
                # The id `correlate` gave this request: the dispatch keeps it.
                context={VERIFIED: True, "correlation_id": logs.current_correlation_id()},
            )
        except SlackPayloadError as exc:
            log.warning("slack request rejected (%d bytes): %s", len(body), exc)
            return web.json_response({"error": "bad request"}, status=400)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            # Bolt could not read a body of a shape Slack does not send.
            log.warning(
                "slack request rejected (%d bytes): Bolt cannot read it (%s)",
                len(body),
                type(exc).__name__,
            )
            return web.json_response({"error": "bad request"}, status=400)
        return await to_aiohttp_response(await bolt.async_dispatch(bolt_request))

    return slack_events


class UnverifiedRequest(Exception):
    """A request reached Bolt without the route's signature check or Socket Mode's websocket."""


class OnlyVerified(AsyncMiddleware):
    """Let through only a request this route verified, or one from Socket Mode's websocket.

    Bolt's own signature check is off over HTTP, since the route checked the raw bytes first: a
    request dispatched some other way (a new route, another adapter) fails here, and the app's
    error handler, seeing it unverified, answers nothing.
    """

    async def async_process(
        self,
        *,
        req: AsyncBoltRequest,
        resp: BoltResponse,
        next: Callable[[], Awaitable[BoltResponse]],
    ) -> BoltResponse | None:
        if req.context.get(VERIFIED) is not True and req.mode != "socket_mode":
            raise UnverifiedRequest("not verified by the Slack route")
        return await next()


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving (nothing else is checked)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to work: Redis answers now, and Slack and Buildkite accepted the tokens."""
    ready, checks = await request.app[READINESS_KEY].report()
    body: dict[str, object] = {
        "status": "ready" if ready else "not ready",
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    if not ready:
        body["failing"] = [c.name for c in checks if not c.ok]
    return web.json_response(body, status=200 if ready else 503)


async def metrics_page(request: web.Request) -> web.Response:
    """Prometheus metrics of this process."""
    metrics = request.app[METRICS_KEY]
    store = request.app[SERVICES_KEY].store
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        metrics.builds_pending.set(await asyncio.wait_for(store.pending_count(), 2.0))
    return web.Response(
        body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def buildkite_webhook(request: web.Request) -> web.Response:
    """Verify a Buildkite webhook, drop a replay or an impossible build, then feed its build to
    the tracker."""
    services = request.app[SERVICES_KEY]
    count = request.app[METRICS_KEY].webhook
    token = services.settings.buildkite_webhook_token
    body = await request.read()
    if token is None:
        log.warning("webhook refused: BUILDKITE_WEBHOOK_TOKEN is not set")
        count(None, "not_configured")
        return web.json_response({"error": "webhooks are not configured"}, status=401)
    try:
        signature = verify_webhook(request.headers, body, token)
    except WebhookVerificationError as exc:
        log.warning("webhook refused: %s", exc)
        count(None, "unverified")
        return web.json_response({"error": "unverified"}, status=401)
    event_name = request.headers.get("X-Buildkite-Event")
    try:
        # The same signed delivery again: Buildkite signs each one with its own time.
        replayed = signature is not None and not await services.store.claim_webhook(signature)
    except RedisError as exc:
        log.error("webhook %s not recorded, redis unavailable: %s", event_name, exc)
        count(event_name, "tracking_unavailable")
        return web.json_response({"error": "tracking unavailable"}, status=503)
    if replayed:
        log.info("webhook %s dropped: a replay of a delivery already received", event_name)
        count(event_name, "duplicate")
        return web.json_response({"ok": True, "duplicate": True})
    try:
        event = parse_webhook(request.headers, body)
    except WebhookPayloadError as exc:
        log.warning("webhook payload rejected: %s", exc)
        count(event_name, "bad_payload")
        return web.json_response({"error": "bad payload"}, status=400)
    if event.build is None:
        count(event.event, "ignored")
        return web.json_response({"ok": True, "ignored": event.event})
    settings = services.settings
    web_hosts, api_hosts = buildkite_hosts(str(settings.buildkite_api_url))
    problem = implausible_build(
        event.build, org=settings.buildkite_org, web_hosts=web_hosts, api_hosts=api_hosts
    )
    if problem is not None:
        log.warning("webhook %s refused: %s", event.event, problem.reason)
        if problem.foreign:
            count(event.event, "other_organization")
            return web.json_response({"ok": True, "ignored": "another organization's build"})
        count(event.event, "implausible")
        return web.json_response({"error": f"impossible build: {problem.reason}"}, status=400)
    try:
        changed = await services.router.on_build(event.build, event.pipeline)
    except RedisError as exc:
        # Buildkite retries nothing we can count on; the poller catches up once Redis is back.
        log.error("webhook %s not recorded, redis unavailable: %s", event.event, exc)
        count(event.event, "tracking_unavailable")
        if signature is not None:
            with contextlib.suppress(RedisError):
                await services.store.release_webhook(signature)
        return web.json_response({"error": "tracking unavailable"}, status=503)
    count(event.event, "accepted")
    return web.json_response({"ok": True, "changed": changed is not None})
