"""What every handler module shares: `listen`, the one way to register listeners (each wrapped
once in `answer_errors`), and `ephemeral`, the answer only the person who asked sees. (A clicked
button's value is read by `app.slack.payloads.action_value`.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel
from slack_bolt.async_app import AsyncApp, AsyncRespond

from handlers.errors import answer_errors

Listener = Callable[..., Awaitable[None]]
M = TypeVar("M", bound=BaseModel)


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
