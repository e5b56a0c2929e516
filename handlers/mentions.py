"""Slack listener for `@bot <command>` (the `app_mention` event): in a build's thread it acts on
that build as its buttons do; anywhere else it answers with help.

The answer goes in the thread, keyed by the event so that it shows once; a refusal goes to the
person only. Slack retries a delivery it thinks was lost (X-Slack-Retry-Num over HTTP,
retry_attempt over Socket Mode) with the same event_id: Bolt runs the listener again for it, so
the event's id is claimed first and a retry does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncAck, AsyncApp

from app.core.services import Services
from app.core.thread_commands import (
    AlreadyShown,
    InThread,
    Mention,
    ThreadCommands,
    event_id_of,
)
from app.slack.outbox import SlackDeliveryError
from app.slack.render.common import notice
from handlers.common import listen
from handlers.errors import error_text

log = logging.getLogger(__name__)

EVENTS = ("app_mention",)


def register(app: AsyncApp) -> None:
    listen(app, events={"app_mention": app_mention})


async def first_delivery(services: Services, body: dict[str, Any]) -> bool:
    """Whether this Events API delivery is the first of its event (not one of Slack's retries).

    An event without an id is not one Slack sends: it is dropped.
    """
    event_id = event_id_of(body)
    if event_id is None:
        return False
    try:
        first = await services.store.first_event(event_id)
    except RedisError as exc:
        # Without Redis a mutation's own claim refuses it; only an answer may show twice.
        log.warning("could not check an event for a retry (redis: %s)", exc)
        return True
    if not first:
        event_type = (body.get("event") or {}).get("type")
        log.info("dropped a retried %s event (%s)", event_type, event_id[:16])
    return first


async def app_mention(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    await ack()
    mention = Mention.from_body(body)
    if mention is None or not await first_delivery(services, body):
        return
    thread = mention.thread_ts or mention.ts
    try:
        outcome = await ThreadCommands(services).run(mention)
        if isinstance(outcome, InThread):
            await services.outbox.post(
                mention.channel,
                outcome.rendered,
                thread_ts=thread,
                key=f"mention:{mention.event_id}",
            )
        elif not isinstance(outcome, AlreadyShown):
            await services.outbox.ephemeral(
                mention.channel, mention.user, outcome.rendered, thread_ts=thread
            )
    except SlackDeliveryError:
        raise  # nowhere to say it: the outbox logged why
    except Exception as exc:  # every refusal and failure is told to the person who asked
        text = error_text(exc)
        await services.outbox.ephemeral(
            mention.channel, mention.user, notice(text), thread_ts=thread
        )
