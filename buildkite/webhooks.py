"""Verify and parse Buildkite webhook requests (token or HMAC signature mode).

https://buildkite.com/docs/apis/webhooks
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from buildkite.errors import WebhookPayloadError, WebhookVerificationError
from buildkite.models import Agent, Build, Job, Person, PipelineRef

__all__ = [
    "EVENT_HEADER",
    "SIGNATURE_HEADER",
    "TOKEN_HEADER",
    "WebhookEvent",
    "WebhookPayloadError",
    "WebhookVerificationError",
    "parse_webhook",
    "sign",
    "verify_webhook",
]

EVENT_HEADER = "X-Buildkite-Event"
TOKEN_HEADER = "X-Buildkite-Token"  # noqa: S105 (a header name, not a secret)
SIGNATURE_HEADER = "X-Buildkite-Signature"


class WebhookEvent(BaseModel):
    """One webhook delivery: the event name and whichever resources its payload carries."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event: str
    build: Build | None = None
    job: Job | None = None
    pipeline: PipelineRef | None = None
    agent: Agent | None = None
    sender: Person | None = None

    @property
    def is_build_event(self) -> bool:
        return self.event.startswith("build.") and self.build is not None


def sign(body: bytes, token: str | SecretStr, timestamp: int | str) -> str:
    """The hex HMAC-SHA256 Buildkite puts in ``X-Buildkite-Signature`` for this body and time."""
    key = _secret(token).encode()
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    token: str | SecretStr,
    *,
    now: float | None = None,
    tolerance: float = 300,
) -> None:
    """Raise ``WebhookVerificationError`` unless the request provably comes from Buildkite.

    Accepts ``X-Buildkite-Token`` or ``X-Buildkite-Signature``; when both are sent, both must
    verify. A signature's timestamp must be within ``tolerance`` seconds of ``now``, so a
    captured request cannot be replayed later.
    """
    secret = _secret(token)
    if not secret:
        raise ValueError("no webhook token configured: every webhook would verify")
    sent_token = _header(headers, TOKEN_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if sent_token is None and signature is None:
        raise WebhookVerificationError(f"neither {TOKEN_HEADER} nor {SIGNATURE_HEADER} was sent")
    if sent_token is not None and not hmac.compare_digest(sent_token.encode(), secret.encode()):
        raise WebhookVerificationError(f"{TOKEN_HEADER} does not match")
    if signature is not None:
        _verify_signature(signature, body, secret, time.time() if now is None else now, tolerance)


def parse_webhook(headers: Mapping[str, str], body: bytes) -> WebhookEvent:
    """Parse a verified webhook body; a build without ``pipeline`` gets the payload's one."""
    try:
        payload = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        raise WebhookPayloadError("body is not JSON") from None
    if not isinstance(payload, dict):
        raise WebhookPayloadError("body is not a JSON object")
    event = _header(headers, EVENT_HEADER) or payload.get("event")
    if not isinstance(event, str) or not event:
        raise WebhookPayloadError(f"no event name in {EVENT_HEADER} or the body")
    fields: dict[str, Any] = {"event": event}
    for name in ("build", "job", "pipeline", "agent", "sender"):
        if isinstance(payload.get(name), dict) and payload[name]:
            fields[name] = payload[name]
    try:
        parsed = WebhookEvent.model_validate(fields)
    except ValidationError as exc:
        fields_at_fault = sorted({str(error["loc"][0]) for error in exc.errors() if error["loc"]})
        raise WebhookPayloadError(f"unexpected {', '.join(fields_at_fault)} in {event}") from None
    if parsed.build is not None and parsed.build.pipeline is None and parsed.pipeline is not None:
        # Build events carry the pipeline beside the build, not inside it.
        build = parsed.build.model_copy(update={"pipeline": parsed.pipeline})
        parsed = parsed.model_copy(update={"build": build})
    return parsed


def _verify_signature(header: str, body: bytes, secret: str, now: float, tolerance: float) -> None:
    parts = dict(_pairs(header.split(",")))
    timestamp, signature = parts.get("timestamp", ""), parts.get("signature", "")
    if not timestamp.isascii() or not timestamp.isdigit() or not _is_sha256_hex(signature):
        raise WebhookVerificationError(
            f"{SIGNATURE_HEADER} is not timestamp=<unix>,signature=<hex>"
        )
    expected = sign(body, secret, timestamp)
    # Check the signature before the clock, so a forger learns nothing about our time window.
    if not hmac.compare_digest(signature.lower().encode(), expected.encode()):
        raise WebhookVerificationError("signature does not match")
    if abs(now - int(timestamp)) > tolerance:
        raise WebhookVerificationError(f"timestamp is more than {tolerance:.0f}s from now")


def _pairs(items: Iterable[str]) -> Iterable[tuple[str, str]]:
    for item in items:
        key, sep, value = item.strip().partition("=")
        if sep:
            yield key.strip(), value.strip()


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(char in "0123456789abcdefABCDEF" for char in value)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that refuses two different values for one name."""
    wanted = name.lower()
    values = {value for key, value in headers.items() if key.lower() == wanted}
    if len(values) > 1:
        raise WebhookVerificationError(f"{name} was sent more than once")
    return values.pop() if values else None


def _secret(token: str | SecretStr) -> str:
    return token.get_secret_value() if isinstance(token, SecretStr) else token
