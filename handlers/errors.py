"""Turning failures into answers: a `UserError` becomes its text, anything else a reference.

Listeners are wrapped with `answer_errors` rather than left to Bolt's error handler alone: with
`process_before_response=False`, Bolt resets an acknowledged request to "not acknowledged" when
its listener raises within a few milliseconds of `ack()`, and Slack then sees a 404. The same
`report_error` also serves, through `report_bolt_error`, as the app's `@app.error` handler for
failures outside listeners: only for a request whose signature was checked (or that came over
Socket Mode's authenticated websocket), so that nothing is ever said to a stranger.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec

from slack_bolt.request.async_request import AsyncBoltRequest

from app.core.errors import UserError
from app.ops.logs import current_correlation_id
from app.ops.observability import request_finished
from app.slack.render.answers import bot_failed
from app.slack.verification import VERIFIED

log = logging.getLogger(__name__)

P = ParamSpec("P")


def error_text(error: Exception) -> str:
    """What to tell the person about `error`: a `UserError`'s own text, or, for anything else,
    a reference to the ERROR line logged here with its traceback."""
    if isinstance(error, UserError):
        return error.text
    ref = current_correlation_id() or uuid.uuid4().hex[:8]
    log.error("unexpected error (ref %s)", ref, exc_info=error)
    return bot_failed(ref)


async def report_error(error: Exception, body: dict[str, Any], respond: Any) -> None:
    """Tell the person what went wrong, ephemerally; log unexpected errors with a reference."""
    text = error_text(error)
    if respond is not None and (body.get("response_url") or body.get("response_urls")):
        await respond(text=text, response_type="ephemeral", replace_original=False)
    else:
        log.warning("could not tell the user: %s", text)


async def report_bolt_error(
    error: Exception, body: dict[str, Any], respond: Any, request: AsyncBoltRequest
) -> None:
    """Bolt's error handler: `report_error`, for a request known to come from Slack only."""
    if request.mode == "socket_mode" or request.context.get(VERIFIED) is True:
        await report_error(error, body, respond)
        return
    # Unreachable through the bot's routes, which verify first; never answer such a request.
    log.warning("unverified request not answered: %s", type(error).__name__)


def answer_errors(listener: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Run a listener, answering its failures with `report_error` (keeps Bolt's injection),
    and count the request with its outcome once the listener is done.

    Before the listener's `ack()` this costs a set insertion: the ack waits for nothing here.
    """

    @functools.wraps(listener)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        # Registered so that shutdown waits for requests acknowledged but not yet done.
        services = kwargs.get("services")
        task = asyncio.current_task()
        inflight: set[Any] = getattr(services, "inflight", set())
        if task is not None:
            inflight.add(task)
        outcome = "error"
        try:
            await listener(*args, **kwargs)
            outcome = "ok"
        except Exception as error:  # every failure gets an answer, never silence
            outcome = "user_error" if isinstance(error, UserError) else "error"
            body: Any = kwargs.get("body") or kwargs.get("command")
            await report_error(error, body if isinstance(body, dict) else {}, kwargs.get("respond"))
        finally:
            inflight.discard(task)
            request_finished(outcome)

    return wrapper
