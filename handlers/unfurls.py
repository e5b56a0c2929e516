"""Slack listeners for pasted build links: `link_shared` (unfurl them as live build cards) and
the "Follow this build" message shortcut (follow the linked build in that message's thread)."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond

from app.core.services import Services
from app.core.unfurls import SharedLinks, Unfurls
from app.slack.actor import Actor
from app.slack.ids import CallbackId
from app.slack.render import threads
from handlers.common import ephemeral, listen
from handlers.mentions import first_delivery

EVENTS = ("link_shared",)
SHORTCUTS = (CallbackId.FOLLOW_BUILD.value,)


def register(app: AsyncApp) -> None:
    listen(
        app,
        events={"link_shared": link_shared},
        shortcuts={CallbackId.FOLLOW_BUILD.value: follow_build},
    )


async def link_shared(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    await ack()
    shared = SharedLinks.from_event(body.get("event") or {})
    if shared is None or not await first_delivery(services, body):
        return
    cards = await Unfurls(services).cards(shared)
    if cards:
        await services.outbox.unfurl(
            cards,
            channel=shared.channel,
            ts=shared.message_ts,
            unfurl_id=shared.unfurl_id,
            source=shared.source,
        )


async def follow_build(
    ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, services: Services
) -> None:
    await ack()
    actor = Actor.from_button(body)
    trigger = str(body.get("trigger_id") or body.get("action_ts") or "")
    message = body.get("message")
    pipeline, build = await Unfurls(services).follow(
        message if isinstance(message, dict) else {}, actor, trigger=trigger
    )
    await ephemeral(respond, threads.following(pipeline, build))
