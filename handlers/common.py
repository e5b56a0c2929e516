"""What every handler module shares: `listen`, the one way to register listeners (each wrapped
once in `answer_errors`), and `ephemeral`, the answer only the person who asked sees. (A clicked
button's value is read by `app.slack.payloads.action_value`.)"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond

from app.core.deploy_queue import QueueClosed
from app.core.services import Services
from app.slack.render import answers
from handlers.errors import answer_errors

Listener = Callable[..., Awaitable[None]]
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def listen(
    app: AsyncApp,
    *,
    commands: Mapping[str, Listener] | None = None,
    actions: Mapping[str, Listener] | None = None,
    views: Mapping[str, Listener] | None = None,
    events: Mapping[str, Listener] | None = None,
    shortcuts: Mapping[str, Listener] | None = None,
) -> None:
    """Register each listener for its slash command, action id, modal callback id, Events API
    event type or shortcut callback id."""
    for name, listener in (commands or {}).items():
        app.command(name)(answer_errors(listener))
    for action_id, listener in (actions or {}).items():
        app.action(action_id)(answer_errors(listener))
    for callback_id, listener in (views or {}).items():
        app.view(callback_id)(answer_errors(listener))
    for event_type, listener in (events or {}).items():
        app.event(event_type)(answer_errors(listener))
    for callback_id, listener in (shortcuts or {}).items():
        app.shortcut(callback_id)(answer_errors(listener))


async def ephemeral(respond: AsyncRespond, text: str, **kwargs: Any) -> None:
    """Answer with `text` that only the person who asked sees, below what they clicked."""
    await respond(text=text, response_type="ephemeral", replace_original=False, **kwargs)


async def in_deploy_queue(
    services: Services,
    ack: AsyncAck,
    respond: AsyncRespond,
    pipeline: str,
    acked: Callable[[int], str],
    work: Callable[[], Awaitable[T]],
) -> T | None:
    """Run a command that starts a deploy (/deploy, rollback, promote) in its turn of /deploy's
    queue: refused in its ack when the queue is full, acknowledged with `acked(place)` else.
    None when it never ran: queue full, or the bot stopping before its turn came (the person
    is told, rather than left with "Starting…"). The place is given back once `work` is done."""
    place = services.deploys.reserve()
    if place is None:
        await ack(text=answers.too_many_deploys(pipeline))
        return None
    async with place:
        await ack(text=acked(place.position))
        try:
            await place.turn()
        except (asyncio.CancelledError, QueueClosed) as exc:
            with contextlib.suppress(Exception):
                await ephemeral(respond, answers.not_started_shutdown(pipeline))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None
        try:
            return await work()
        except asyncio.CancelledError:
            # Cut short by the shutdown's time limit, maybe after Buildkite created the build.
            with contextlib.suppress(Exception):
                await ephemeral(respond, answers.interrupted_shutdown(pipeline))
            raise
