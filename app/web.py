"""The bot's HTTP surface: Slack's events endpoint, Buildkite's webhook, and health.

In Socket Mode the Slack route is absent (Slack talks over the websocket); the others stay.
"""

from __future__ import annotations

import logging

from aiohttp import web
from redis.exceptions import RedisError
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp

from app.operations import Services
from buildkite.webhooks import (
    WebhookPayloadError,
    WebhookVerificationError,
    parse_webhook,
    verify_webhook,
)

log = logging.getLogger(__name__)

SERVICES_KEY = web.AppKey("services", Services)
MAX_BODY = 1024 * 1024


def create_web_app(services: Services, bolt: AsyncApp | None) -> web.Application:
    """Routes: POST /slack/events (HTTP mode only), POST /buildkite/webhook, GET /healthz."""
    app = web.Application(client_max_size=MAX_BODY)
    app[SERVICES_KEY] = services
    if bolt is not None:

        async def slack_events(request: web.Request) -> web.Response:
            return await to_aiohttp_response(
                await bolt.async_dispatch(await to_bolt_request(request))
            )

        app.router.add_post("/slack/events", slack_events)
    app.router.add_post("/buildkite/webhook", buildkite_webhook)
    app.router.add_get("/healthz", healthz)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def buildkite_webhook(request: web.Request) -> web.Response:
    """Verify a Buildkite webhook, then feed its build to the tracker."""
    services = request.app[SERVICES_KEY]
    token = services.settings.buildkite_webhook_token
    body = await request.read()
    if token is None:
        log.warning("webhook refused: BUILDKITE_WEBHOOK_TOKEN is not set")
        return web.json_response({"error": "webhooks are not configured"}, status=401)
    try:
        verify_webhook(request.headers, body, token)
    except WebhookVerificationError as exc:
        log.warning("webhook refused: %s", exc)
        return web.json_response({"error": "unverified"}, status=401)
    try:
        event = parse_webhook(request.headers, body)
    except WebhookPayloadError as exc:
        log.warning("webhook payload rejected: %s", exc)
        return web.json_response({"error": "bad payload"}, status=400)
    if event.build is None:
        return web.json_response({"ok": True, "ignored": event.event})
    try:
        changed = await services.tracker.observe(event.build)
    except RedisError as exc:
        # Buildkite retries nothing we can count on; the poller catches up once Redis is back.
        log.error("webhook %s not recorded, redis unavailable: %s", event.event, exc)
        return web.json_response({"error": "tracking unavailable"}, status=503)
    return web.json_response({"ok": True, "changed": changed is not None})
