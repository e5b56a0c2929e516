"""What the fake Slack shares: its limits and scopes, recorded calls and posts, and Block Kit's
checks. Part of the sandbox's and the tests' simulator of Slack.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")
Json = dict[str, Any]

# Form bodies carry structured arguments as JSON strings; these are decoded before recording.
JSON_FIELDS = frozenset({"blocks", "attachments", "view", "metadata", "unfurls"})
# slack_sdk sends booleans in query/form params as "1"/"0"; these are decoded to bool.
BOOL_FIELDS = frozenset(
    {
        "as_user",
        "include_all_metadata",
        "include_disabled",
        "inclusive",
        "include_locale",
        "include_num_members",
        "link_names",
        "mrkdwn",
        "reply_broadcast",
        "unfurl_links",
        "unfurl_media",
    }
)
APP_TOKEN_METHODS = frozenset({"apps.connections.open"})
PERMALINK_BASE = "https://fake-workspace.slack.com/archives"
RESPONSE_URL_MAX_USES = 5
#: Slack answers `msg_blocks_too_long` for a message whose blocks are much over 13k characters
#: in all (seen in practice; not documented exactly): measured here on the blocks' JSON.
MAX_BLOCKS_JSON = 13_000
#: The bot scopes manifest.yml asks for; `chat:write.public` lets it post in public channels
#: it is not a member of.
MANIFEST_SCOPES = frozenset(
    {
        "commands",
        "chat:write",
        "chat:write.public",
        "channels:history",
        "groups:history",
        "users:read",
        "users:read.email",
        "usergroups:read",
        "app_mentions:read",
        "links:read",
        "links:write",
        "im:write",
        "im:history",
    }
)


@dataclass(frozen=True)
class RecordedCall:
    """One Web API request: what was sent and what the fake answered."""

    method: str
    args: Json
    headers: dict[str, str]
    time: float  # time.monotonic() when the request arrived
    status: int
    response: Json
    content_type: str = ""
    #: The call was carried out but its answer never reached the caller (`drop_answer_next`).
    answer_lost: bool = False
    #: "host:port" of the client's end of the connection, to count the connections used.
    peer: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.response.get("ok"))


@dataclass(frozen=True)
class ResponseUrlPost:
    """One POST to a response_url handed out by `FakeSlack.response_url()`."""

    name: str
    json: Json
    headers: dict[str, str]
    time: float


@dataclass
class _Fault:
    error: str
    status: int
    retry_after: int
    remaining: int


@dataclass
class _ResponseUrl:
    channel: str | None
    message_ts: str | None
    uses: int = 0


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    ticket: str
    connected_at: float = field(default_factory=time.monotonic)


class _ApiError(Exception):
    """Raised inside a method handler to answer `{"ok": false, "error": code}`."""

    def __init__(self, code: str, *, unexpected: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.unexpected = unexpected


Handler = Callable[[Json], Json]


# ---------------------------------------------------------------------- Block Kit checks


def _public(message: Json) -> Json:
    return {k: v for k, v in message.items() if k != "channel"}


def _text_of(obj: Any) -> str:
    return str(obj.get("text", "")) if isinstance(obj, dict) else ""


def _input_problems(where: str, block: Json) -> list[str]:
    """An input block as Slack checks it: label, hint, and a select's options and defaults."""
    problems = []
    label = _text_of(block.get("label"))
    if not label or len(label) > 2000:
        problems.append(f"{where}: label missing or longer than 2000")
    if len(_text_of(block.get("hint"))) > 2000:
        problems.append(f"{where}: hint longer than 2000")
    element = block.get("element")
    if not isinstance(element, dict) or "type" not in element:
        return [*problems, f"{where}: no element"]
    if element["type"] == "plain_text_input":
        if len(str(element.get("initial_value", ""))) > 3000:
            problems.append(f"{where}: initial_value longer than 3000")
    elif element["type"] in ("static_select", "multi_static_select"):
        options = element.get("options") or []
        if not 1 <= len(options) <= 100:
            problems.append(f"{where}: {len(options)} options (1 to 100)")
        for option in options:
            if len(_text_of(option.get("text"))) > 75 or len(str(option.get("value", ""))) > 150:
                problems.append(f"{where}: option text over 75 or value over 150")
        initial = element.get("initial_options") or []
        if "initial_option" in element:
            if element["type"] != "static_select":
                problems.append(f"{where}: initial_option on a {element['type']}")
            initial = [element["initial_option"]]
        elif initial and element["type"] != "multi_static_select":
            problems.append(f"{where}: initial_options on a {element['type']}")
        if any(o not in options for o in initial):
            problems.append(f"{where}: an initial option is not one of the options")
    return problems


def block_problems(blocks: list[Any], *, max_blocks: int) -> list[str]:
    """Block Kit limits a real Slack would reject (PLATFORM.md), as readable problems."""
    problems: list[str] = []
    if len(blocks) > max_blocks:
        problems.append(f"{len(blocks)} blocks (max {max_blocks})")
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or "type" not in block:
            problems.append(f"block {i} has no type: {block!r}")
            continue
        kind = block["type"]
        where = f"block {i} ({kind})"
        if len(str(block.get("block_id", ""))) > 255:
            problems.append(f"{where}: block_id longer than 255")
        if kind == "section":
            if len(_text_of(block.get("text"))) > 3000:
                problems.append(f"{where}: text longer than 3000")
            fields = block.get("fields", [])
            if len(fields) > 10 or any(len(_text_of(f)) > 2000 for f in fields):
                problems.append(f"{where}: more than 10 fields or a field over 2000")
        elif kind == "header" and len(_text_of(block.get("text"))) > 150:
            problems.append(f"{where}: header longer than 150")
        elif kind == "context" and len(block.get("elements", [])) > 10:
            problems.append(f"{where}: more than 10 elements")
        elif kind == "actions" and len(block.get("elements", [])) > 25:
            problems.append(f"{where}: more than 25 elements")
        elif kind == "input":
            problems += _input_problems(where, block)
        elements = list(block.get("elements", []))
        if isinstance(block.get("accessory"), dict):
            elements.append(block["accessory"])
        for element in elements:
            if not isinstance(element, dict) or element.get("type") != "button":
                continue
            if len(_text_of(element.get("text"))) > 75:
                problems.append(f"{where}: button text longer than 75")
            if len(str(element.get("value", ""))) > 2000:
                problems.append(f"{where}: button value longer than 2000")
            if len(str(element.get("action_id", ""))) > 255:
                problems.append(f"{where}: action_id longer than 255")
    return problems
