"""Button clicks and modal submissions happen once: a signed one delivered again (a replay) is
acknowledged and dropped.

Slack accepts a signature for five minutes, so anyone who captures one click can send it again in
that time. A click is identified by what Slack sent for it (its action_ts, the message it was on
and who clicked); a deliberate new click has a new action_ts and goes through. The 30-second
guard per button (ACTION_TTL in app.storage) still turns a colleague's separate click into
"already asked". A modal submission is identified by its own trigger_id: the unblock form's
values are sent to Buildkite once. (A slash command's claim, by its trigger_id, lasts a day: see
Operations.)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncBoltRequest
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.response import BoltResponse

from app.storage.store import Store

log = logging.getLogger(__name__)


def click_identity(body: dict[str, Any]) -> str | None:
    """The identity of a block_actions click or a modal submission, or None for any other
    request (or one without the action_ts or trigger_id that tells it apart)."""
    if body.get("type") == "view_submission":
        return _submission_identity(body)
    if body.get("type") != "block_actions":
        return None
    actions = body.get("actions")
    action = actions[0] if isinstance(actions, list) and actions else None
    if not isinstance(action, dict) or not action.get("action_ts"):
        return None
    container, message, user, view = (
        _mapping(body, key) for key in ("container", "message", "user", "view")
    )
    parts = [
        str(action.get("action_ts")),
        str(action.get("action_id")),
        str(container.get("message_ts") or message.get("ts") or view.get("id") or ""),
        str(user.get("id") or ""),
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _submission_identity(body: dict[str, Any]) -> str | None:
    # Slack sends each submission of a modal with a trigger_id of its own: submitting it again
    # (after a "missing field" answer, say) is a new request, and the same bytes again a replay.
    view, user = _mapping(body, "view"), _mapping(body, "user")
    if not body.get("trigger_id"):
        return None
    parts = ["view", str(body["trigger_id"]), str(view.get("id") or ""), str(user.get("id") or "")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _mapping(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    return value if isinstance(value, dict) else {}


class DropReplayedClicks(AsyncMiddleware):
    """Acknowledge a click seen before and run no listener for it.

    Runs after Bolt's signature check, so only signed requests are remembered. Without Redis the
    click goes on: the operation's own claim then answers that tracking is unavailable.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    async def async_process(
        self,
        *,
        req: AsyncBoltRequest,
        resp: BoltResponse,
        next: Callable[[], Awaitable[BoltResponse]],
    ) -> BoltResponse | None:
        identity = click_identity(req.body)
        if identity is not None:
            try:
                first = await self.store.first_click(identity)
            except RedisError as exc:
                log.warning("could not check a click for a replay (redis: %s)", exc)
                first = True
            if not first:
                what = (
                    "modal submission"
                    if req.body.get("type") == "view_submission"
                    else "button click"
                )
                log.warning("dropped a replayed %s (%s)", what, identity[:12])
                return BoltResponse(status=200, body="")
        return await next()
