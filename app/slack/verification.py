"""Slack's request signature, checked before Bolt or anything else reads a request's body.

A request that fails the check is refused unread: its body is never parsed, logged or acted on,
and nothing is sent anywhere because of it. A signed body Bolt could not read is refused too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl

from multidict import CIMultiDictProxy

#: Slack's window: a request signed longer ago than this (or this far ahead) is refused.
MAX_SKEW_SECONDS = 300
#: The key, in a Bolt request's context, that says this process checked its signature.
VERIFIED = "slack_signature_verified"

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
_SIGNATURE_HEADER = "X-Slack-Signature"


class SlackVerificationError(Exception):
    """The request is not one Slack signed (recently). The text names no header value."""


class SlackPayloadError(Exception):
    """A signed request whose body is not one Slack sends. The text quotes nothing of it."""


def verify_slack_request(
    headers: CIMultiDictProxy[str], body: bytes, signing_secret: str, *, now: float
) -> None:
    """Check Slack's v0 signature of `body`, made within 5 minutes of `now`, or raise."""
    timestamp = _one(headers, _TIMESTAMP_HEADER)
    if not _TIMESTAMP.fullmatch(timestamp):
        raise SlackVerificationError(f"{_TIMESTAMP_HEADER} is not a whole number of seconds")
    skew = abs(now - int(timestamp))
    if skew > MAX_SKEW_SECONDS:
        raise SlackVerificationError(
            f"signed {skew:.0f} s away from now (more than {MAX_SKEW_SECONDS} s)"
        )
    signature = _one(headers, _SIGNATURE_HEADER)
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    # Bytes: compare_digest refuses a str with non-ASCII characters, and headers may carry them.
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise SlackVerificationError("the signature does not match")


def _one(headers: CIMultiDictProxy[str], name: str) -> str:
    values = headers.getall(name, [])
    if not values:
        raise SlackVerificationError(f"no {name} header")
    if len(values) > 1:
        # Bolt checks again and would read another copy than the one checked here.
        raise SlackVerificationError(f"more than one {name} header")
    return values[0]


def read_slack_body(headers: Mapping[str, str], body: bytes) -> str:
    """A verified body as text that Bolt can read (its `parse_body`, which raises), or raise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SlackPayloadError("the body is not UTF-8") from None
    if not text:
        return text
    content_type = headers.get("Content-Type", "").split(";")[0]
    if content_type == "application/json" or text.startswith("{"):
        _json_object(text, "the JSON body")
    elif "payload" in text:
        payload = dict(parse_qsl(text, keep_blank_values=True)).get("payload")
        if payload is not None:
            _json_object(payload, "the payload field")
    return text


def _json_object(text: str, what: str) -> None:
    try:
        value = json.loads(text)
    except ValueError:
        raise SlackPayloadError(f"{what} is not JSON") from None
    except RecursionError:  # nested deeper than Python's stack: no body Slack sends
        raise SlackPayloadError(f"{what} is nested too deeply") from None
    if not isinstance(value, dict):
        raise SlackPayloadError(f"{what} is not a JSON object")
