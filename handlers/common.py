"""What every handler module shares: `listen`, the one way to register listeners (each wrapped
once in `answer_errors`), `button_value`, the one parser of a clicked button's value, and
`ephemeral`, the answer only the person who asked sees."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from slack_bolt.async_app import AsyncApp, AsyncRespond

from app.core.operations import UserError
from handlers.errors import answer_errors

Listener = Callable[..., Awaitable[None]]
M = TypeVar("M", bound=BaseModel)

STALE_BUTTON = "This button's data is not valid any more; nothing was done."


def listen(
    app: AsyncApp,
    *,
    commands: Mapping[str, Listener] | None = None,
    actions: Mapping[str, Listener] | None = None,
    views: Mapping[str, Listener] | None = None,
) -> None:
    """Register each listener for its slash command, action id or modal callback id."""
    for name, listener in (commands or {}).items():
        app.command(name)(answer_errors(listener))
    for action_id, listener in (actions or {}).items():
        app.action(action_id)(answer_errors(listener))
    for callback_id, listener in (views or {}).items():
        app.view(callback_id)(answer_errors(listener))


async def ephemeral(respond: AsyncRespond, text: str, **kwargs: Any) -> None:
    """Answer with `text` that only the person who asked sees, below what they clicked."""
    await respond(text=text, response_type="ephemeral", replace_original=False, **kwargs)


def button_value(body: dict[str, Any], model: type[M]) -> M:
    """The clicked button's value, as `model`; a `UserError` when it is not one (any more)."""
    try:
        return model.model_validate_json(body["actions"][0].get("value") or "")
    except (ValidationError, KeyError, IndexError):
        raise UserError(STALE_BUTTON) from None
