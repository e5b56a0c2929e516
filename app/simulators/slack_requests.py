"""Inbound Slack requests as Slack sends them: signed HTTP bodies and Socket Mode payloads.

Part of the sandbox's and the tests' simulators of Slack and Buildkite.

Every `*_payload` function returns the plain dict Slack puts in a Socket Mode envelope; its
unsuffixed twin returns `(body, headers)` for an HTTP POST, signed the way Slack signs it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

DEFAULT_API_APP_ID = "A0FAKE"
DEFAULT_TEAM_DOMAIN = "fake-workspace"
# The legacy verification token Slack still includes in every payload; Bolt ignores it.
VERIFICATION_TOKEN = "fake-verification-token"


def signed_headers(
    body: bytes, *, signing_secret: str, content_type: str, timestamp: int | None = None
) -> dict[str, str]:
    """Headers Slack sends with `body`: content type, timestamp and the v0 HMAC-SHA256 signature."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = b"v0:" + ts.encode() + b":" + body
    digest = hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}",
    }


def new_trigger_id() -> str:
    """A random trigger id in Slack's shape (`<digits>.<digits>.<hex>`)."""
    return (
        f"{secrets.randbelow(10**11):011d}.{secrets.randbelow(10**9):09d}.{secrets.token_hex(16)}"
    )


def _action_ts() -> str:
    return f"{time.time():.6f}"


# --------------------------------------------------------------------------- slash commands


def slash_command_payload(
    command: str,
    text: str = "",
    *,
    response_url: str,
    user_id: str = "U0USER",
    user_name: str = "alice",
    channel_id: str = "C0CHAN",
    channel_name: str = "deploys",
    team_id: str = "T0001",
    team_domain: str = DEFAULT_TEAM_DOMAIN,
    trigger_id: str | None = None,
    api_app_id: str = DEFAULT_API_APP_ID,
) -> dict[str, str]:
    """The fields of a slash command, all strings, exactly as Slack form-encodes them."""
    return {
        "token": VERIFICATION_TOKEN,
        "team_id": team_id,
        "team_domain": team_domain,
        "channel_id": channel_id,
        "channel_name": channel_name,
        "user_id": user_id,
        "user_name": user_name,
        "command": command,
        "text": text,
        "api_app_id": api_app_id,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id or new_trigger_id(),
    }


def slash_command(
    command: str,
    text: str = "",
    *,
    response_url: str,
    signing_secret: str,
    timestamp: int | None = None,
    user_id: str = "U0USER",
    user_name: str = "alice",
    channel_id: str = "C0CHAN",
    channel_name: str = "deploys",
    team_id: str = "T0001",
    team_domain: str = DEFAULT_TEAM_DOMAIN,
    trigger_id: str | None = None,
    api_app_id: str = DEFAULT_API_APP_ID,
) -> tuple[bytes, dict[str, str]]:
    """A signed, form-encoded slash command POST body and its headers."""
    fields = slash_command_payload(
        command,
        text,
        response_url=response_url,
        user_id=user_id,
        user_name=user_name,
        channel_id=channel_id,
        channel_name=channel_name,
        team_id=team_id,
        team_domain=team_domain,
        trigger_id=trigger_id,
        api_app_id=api_app_id,
    )
    body = urlencode(fields).encode()
    return body, signed_headers(
        body, signing_secret=signing_secret, content_type=FORM, timestamp=timestamp
    )


# --------------------------------------------------------------------------- block actions


def _find_element(blocks: Sequence[Mapping[str, Any]], action_id: str) -> dict[str, Any] | None:
    for block in blocks:
        candidates: list[Any] = list(block.get("elements", []))
        if "accessory" in block:
            candidates.append(block["accessory"])
        for element in candidates:
            if isinstance(element, dict) and element.get("action_id") == action_id:
                return {"block_id": block.get("block_id"), **element}
    return None


def block_action_payload(
    action_id: str,
    value: str | None = None,
    *,
    response_url: str,
    message_ts: str | None = None,
    message: Mapping[str, Any] | None = None,
    message_blocks: Sequence[Mapping[str, Any]] | None = None,
    message_text: str = "",
    thread_ts: str | None = None,
    user_id: str = "U0USER",
    user_name: str = "alice",
    channel_id: str = "C0CHAN",
    channel_name: str = "deploys",
    team_id: str = "T0001",
    team_domain: str = DEFAULT_TEAM_DOMAIN,
    trigger_id: str | None = None,
    action_ts: str | None = None,
    block_id: str = "actions",
    bot_user_id: str = "U0BOT",
    api_app_id: str = DEFAULT_API_APP_ID,
    ephemeral: bool = False,
) -> dict[str, Any]:
    """A `block_actions` payload for a button click on a message.

    Pass `message` (e.g. `fake.message(channel, ts)`) or `message_ts` plus `message_blocks`.
    When the message has blocks, the clicked element must be among them, and its `value`,
    `text`, `style` and `block_id` are copied from it, as Slack does; `value=None` means
    "whatever the button carries".

    `ephemeral=True` is a click in a message only the user sees (a confirmation, an answer to a
    command): Slack then sends `container.is_ephemeral: true` and no `message` at all, and its
    `message_ts` is no thread anyone else can see.
    """
    if message is not None:
        msg = {k: v for k, v in message.items() if k != "channel"}
        message_ts = message_ts or str(msg["ts"])
        thread_ts = thread_ts or msg.get("thread_ts")
    else:
        if message_ts is None:
            raise ValueError("block_action_payload needs message_ts or message")
        msg = {
            "type": "message",
            "user": bot_user_id,
            "ts": message_ts,
            "text": message_text,
            "blocks": list(message_blocks or []),
            "team": team_id,
        }
        if thread_ts:
            msg["thread_ts"] = thread_ts

    action: dict[str, Any] = {
        "action_id": action_id,
        "block_id": block_id,
        "type": "button",
        "action_ts": action_ts or _action_ts(),
    }
    blocks = msg.get("blocks") or []
    if blocks:
        element = _find_element(blocks, action_id)
        if element is None:
            raise ValueError(f"no element with action_id={action_id!r} in the message blocks")
        for key in ("block_id", "type", "text", "style", "value", "url"):
            if element.get(key) is not None:
                action[key] = element[key]
    if value is not None:
        action["value"] = value
    if "value" not in action and "url" not in action:
        raise ValueError(f"no value given for action {action_id!r} and none found in the blocks")

    container: dict[str, Any] = {
        "type": "message",
        "message_ts": message_ts,
        "channel_id": channel_id,
        "is_ephemeral": ephemeral,
    }
    if thread_ts and not ephemeral:
        container["thread_ts"] = thread_ts
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": team_id},
        "api_app_id": api_app_id,
        "token": VERIFICATION_TOKEN,
        "container": container,
        "trigger_id": trigger_id or new_trigger_id(),
        "team": {"id": team_id, "domain": team_domain},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel_id, "name": channel_name},
        "message": msg,
        "state": {"values": {}},
        "response_url": response_url,
        "actions": [action],
    }
    if ephemeral:
        del payload["message"]
    return payload


def block_action(
    action_id: str,
    value: str | None = None,
    *,
    response_url: str,
    signing_secret: str,
    timestamp: int | None = None,
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A signed `payload=<json>` form for a button click; `fields` as in `block_action_payload`."""
    payload = block_action_payload(action_id, value, response_url=response_url, **fields)
    return interactive(payload, signing_secret=signing_secret, timestamp=timestamp)


# --------------------------------------------------------------------------- view submissions


def _state_values(values: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    # A bare string is shorthand for a plain_text_input value.
    return {
        block_id: {
            action_id: (
                {"type": "plain_text_input", "value": state}
                if isinstance(state, str) or state is None
                else dict(state)
            )
            for action_id, state in actions.items()
        }
        for block_id, actions in values.items()
    }


def view_submission_payload(
    callback_id: str,
    values: Mapping[str, Mapping[str, Any]],
    private_metadata: str = "",
    *,
    view: Mapping[str, Any] | None = None,
    view_id: str = "V0VIEW",
    user_id: str = "U0USER",
    user_name: str = "alice",
    team_id: str = "T0001",
    team_domain: str = DEFAULT_TEAM_DOMAIN,
    trigger_id: str | None = None,
    api_app_id: str = DEFAULT_API_APP_ID,
    bot_id: str = "B0BOT",
) -> dict[str, Any]:
    """A `view_submission` payload.

    `values` is `{block_id: {action_id: state}}`; a state given as a string becomes
    `{"type": "plain_text_input", "value": ...}`. Pass `view` (e.g. `fake.views[view_id]`) to
    submit the modal the bot actually opened; `callback_id`, `private_metadata` and the state
    given here still win.
    """
    base: dict[str, Any] = {
        "id": view_id,
        "team_id": team_id,
        "type": "modal",
        "title": {"type": "plain_text", "text": "Modal"},
        "blocks": [],
        "hash": "1700000000.fakehash",
        "root_view_id": view_id,
        "previous_view_id": None,
        "app_id": api_app_id,
        "app_installed_team_id": team_id,
        "bot_id": bot_id,
        "external_id": "",
        "clear_on_close": False,
        "notify_on_close": False,
    }
    if view is not None:
        base.update(view)
    base.update(
        callback_id=callback_id,
        private_metadata=private_metadata,
        state={"values": _state_values(values)},
    )
    return {
        "type": "view_submission",
        "team": {"id": team_id, "domain": team_domain},
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": team_id},
        "api_app_id": api_app_id,
        "token": VERIFICATION_TOKEN,
        "trigger_id": trigger_id or new_trigger_id(),
        "view": base,
        "response_urls": [],
        "is_enterprise_install": False,
        "enterprise": None,
    }


def view_submission(
    callback_id: str,
    values: Mapping[str, Mapping[str, Any]],
    private_metadata: str = "",
    *,
    signing_secret: str,
    timestamp: int | None = None,
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A signed `payload=<json>` form for a modal submission; `fields` as in the payload version."""
    payload = view_submission_payload(callback_id, values, private_metadata, **fields)
    return interactive(payload, signing_secret=signing_secret, timestamp=timestamp)


def interactive(
    payload: Mapping[str, Any], *, signing_secret: str, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """Any interactivity payload as Slack posts it: a signed form with one `payload` JSON field."""
    body = urlencode({"payload": json.dumps(payload)}).encode()
    return body, signed_headers(
        body, signing_secret=signing_secret, content_type=FORM, timestamp=timestamp
    )


def home_action_payload(
    view: Mapping[str, Any],
    action_id: str,
    *,
    value: str | None = None,
    selected: str | None = None,
    user_id: str = "U0USER",
    user_name: str = "alice",
    team_id: str = "T0001",
) -> dict[str, Any]:
    """A `block_actions` payload for a button or select of a published Home tab (`view`, as
    views.publish answered it): a `view` container, a trigger_id, and no response_url, no
    channel and no message, as Slack sends it. The element must be in the view; a button's
    value is the one it carries, a select's choice must be one of its options."""
    found = None
    block_id = ""
    for block in view.get("blocks") or []:
        elements = list(block.get("elements") or [])
        if isinstance(block.get("accessory"), dict):
            elements.append(block["accessory"])
        for element in elements:
            if element.get("action_id") == action_id and (
                value is None or element.get("value") == value
            ):
                found, block_id = element, str(block.get("block_id") or "")
                break
        if found is not None:
            break
    if found is None:
        raise ValueError(f"no element {action_id} (value {value!r}) in the Home view")
    action: dict[str, Any] = {
        "action_id": action_id,
        "block_id": block_id,
        "type": found["type"],
        "action_ts": _action_ts(),
    }
    if found["type"] == "button":
        action["value"] = found.get("value", "")
        action["text"] = found.get("text")
    else:
        option = next((o for o in found.get("options") or [] if o["value"] == selected), None)
        if option is None:
            raise ValueError(f"{selected!r} is not an option of {action_id}")
        action["selected_option"] = option
    return {
        "type": "block_actions",
        "token": VERIFICATION_TOKEN,
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": team_id},
        "api_app_id": DEFAULT_API_APP_ID,
        "container": {"type": "view", "view_id": view.get("id", "")},
        "trigger_id": new_trigger_id(),
        "team": {"id": team_id, "domain": DEFAULT_TEAM_DOMAIN},
        "enterprise": None,
        "is_enterprise_install": False,
        "view": dict(view),
        "actions": [action],
    }


def message_shortcut_payload(
    callback_id: str,
    message: Mapping[str, Any],
    *,
    response_url: str,
    channel_id: str = "C0CHAN",
    channel_name: str = "deploys",
    user_id: str = "U0USER",
    user_name: str = "alice",
    team_id: str = "T0001",
    trigger_id: str | None = None,
) -> dict[str, Any]:
    """A `message_action` payload: a message shortcut chosen on `message` (e.g.
    `fake.message(channel, ts)`), as Slack sends it."""
    msg = {k: v for k, v in message.items() if k != "channel"}
    return {
        "type": "message_action",
        "token": VERIFICATION_TOKEN,
        "action_ts": _action_ts(),
        "team": {"id": team_id, "domain": DEFAULT_TEAM_DOMAIN},
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": team_id},
        "channel": {"id": channel_id, "name": channel_name},
        "is_enterprise_install": False,
        "enterprise": None,
        "callback_id": callback_id,
        "trigger_id": trigger_id or new_trigger_id(),
        "response_url": response_url,
        "message_ts": str(msg["ts"]),
        "message": msg,
    }


def message_shortcut(
    callback_id: str,
    message: Mapping[str, Any],
    *,
    response_url: str,
    signing_secret: str,
    timestamp: int | None = None,
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A signed message shortcut, as Slack posts it."""
    payload = message_shortcut_payload(callback_id, message, response_url=response_url, **fields)
    return interactive(payload, signing_secret=signing_secret, timestamp=timestamp)


# --------------------------------------------------------------------------- Events API


def event_callback_payload(
    event: Mapping[str, Any],
    *,
    team_id: str = "T0001",
    api_app_id: str = DEFAULT_API_APP_ID,
    event_id: str | None = None,
    event_time: int | None = None,
) -> dict[str, Any]:
    """An Events API `event_callback` envelope around `event`."""
    return {
        "token": VERIFICATION_TOKEN,
        "team_id": team_id,
        "api_app_id": api_app_id,
        "event": dict(event),
        "type": "event_callback",
        "event_id": event_id or f"Ev{secrets.token_hex(5).upper()}",
        "event_time": int(time.time()) if event_time is None else event_time,
        "authorizations": [],
        "is_ext_shared_channel": False,
    }


def event_callback(
    event: Mapping[str, Any],
    *,
    signing_secret: str,
    timestamp: int | None = None,
    retry_num: int | None = None,
    retry_reason: str = "http_timeout",
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A signed JSON Events API delivery; `retry_num` adds Slack's redelivery headers."""
    body = json.dumps(event_callback_payload(event, **fields)).encode()
    headers = signed_headers(
        body, signing_secret=signing_secret, content_type=JSON, timestamp=timestamp
    )
    if retry_num is not None:
        headers["X-Slack-Retry-Num"] = str(retry_num)
        headers["X-Slack-Retry-Reason"] = retry_reason
    return body, headers


def url_verification(
    challenge: str, *, signing_secret: str, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The signed `url_verification` request Slack sends when the Events URL is configured."""
    body = json.dumps(
        {"token": VERIFICATION_TOKEN, "challenge": challenge, "type": "url_verification"}
    ).encode()
    return body, signed_headers(
        body, signing_secret=signing_secret, content_type=JSON, timestamp=timestamp
    )
