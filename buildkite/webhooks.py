"""Verify and parse Buildkite webhook requests (token or HMAC signature mode).

https://buildkite.com/docs/apis/webhooks
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from buildkite.errors import WebhookPayloadError, WebhookVerificationError
from buildkite.models import Agent, Build, Job, Person, PipelineRef, fields_at_fault, item_id

__all__ = [
    "EVENT_HEADER",
    "MAX_BUILD_NUMBER",
    "SIGNATURE_HEADER",
    "SIGNATURE_TOLERANCE",
    "TOKEN_HEADER",
    "Implausible",
    "Signature",
    "WebhookEvent",
    "WebhookPayloadError",
    "WebhookVerificationError",
    "buildkite_hosts",
    "implausible_build",
    "parse_webhook",
    "sign",
    "verify_webhook",
]

EVENT_HEADER = "X-Buildkite-Event"
TOKEN_HEADER = "X-Buildkite-Token"  # noqa: S105 (a header name, not a secret)
SIGNATURE_HEADER = "X-Buildkite-Signature"

log = logging.getLogger(__name__)

#: Buildkite's own hosts: builds' pages, and the API their `url` names.
BUILDKITE_WEB_HOST = "buildkite.com"
BUILDKITE_API_HOST = "api.buildkite.com"
#: Seconds a signature's timestamp may be from now (either way).
SIGNATURE_TOLERANCE = 300
#: No organization has run this many builds of one pipeline: a larger number is not a build's.
MAX_BUILD_NUMBER = 10**9
_WEB_PATH = re.compile(r"^/(?P<org>[^/]+)/(?P<pipeline>[^/]+)/builds/(?P<number>[0-9]+)/?$")
_API_PATH = re.compile(
    r"/organizations/(?P<org>[^/]+)/pipelines/(?P<pipeline>[^/]+)/builds/(?P<number>[0-9]+)/?$"
)

_PARTS: dict[str, type[BaseModel]] = {
    "build": Build,
    "job": Job,
    "pipeline": PipelineRef,
    "agent": Agent,
    "sender": Person,
}
#: What each family of events cannot do without: one of these must be readable.
_NEEDS = {"build.": ("build",), "job.": ("build", "job"), "agent.": ("agent",)}


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


@dataclass(frozen=True)
class Signature:
    """A verified ``X-Buildkite-Signature``: Buildkite signs each delivery with its own time, so
    a second request carrying the same pair within the tolerance is a replay."""

    timestamp: int
    signature: str


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes,
    token: str | SecretStr,
    *,
    now: float | None = None,
    tolerance: float = SIGNATURE_TOLERANCE,
) -> Signature | None:
    """Raise ``WebhookVerificationError`` unless the request provably comes from Buildkite.

    Accepts ``X-Buildkite-Token`` or ``X-Buildkite-Signature``; when both are sent, both must
    verify. A signature's timestamp must be within ``tolerance`` seconds of ``now``, so a
    captured request cannot be replayed later; within it, the returned `Signature` lets the
    caller drop a replay. Token mode returns None: a token is the same on every delivery.
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
    if signature is None:
        return None
    return _verify_signature(
        signature, body, secret, time.time() if now is None else now, tolerance
    )


def parse_webhook(headers: Mapping[str, str], body: bytes) -> WebhookEvent:
    """Parse a verified webhook body; a build without ``pipeline`` gets the payload's one."""
    try:
        payload = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        raise WebhookPayloadError("body is not JSON") from None
    except RecursionError:  # nested deeper than Python's stack: no body Buildkite sends
        raise WebhookPayloadError("body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise WebhookPayloadError("body is not a JSON object")
    event = _header(headers, EVENT_HEADER) or payload.get("event")
    if not isinstance(event, str) or not event:
        raise WebhookPayloadError(f"no event name in {EVENT_HEADER} or the body")
    build = payload.get("build")
    if isinstance(build, dict) and "number" in build:
        number = build["number"]
        # JSON's own integer: pydantic would also read "7", 7.0 or true as a build number.
        if type(number) is not int or not 1 <= number <= MAX_BUILD_NUMBER:
            raise WebhookPayloadError(
                f"build number is not a whole number from 1 to {MAX_BUILD_NUMBER:,}"
            )
    # Each part is read on its own: one the bot cannot read (an agent with odd times, a job of
    # a new type) is left out, and the rest of the delivery still counts.
    parts: dict[str, Any] = {}
    unreadable: list[str] = []
    for name, model in _PARTS.items():
        value = payload.get(name)
        if not isinstance(value, dict) or not value:
            continue
        try:
            parts[name] = model.model_validate(value)
        except ValidationError as exc:
            unreadable.append(name)
            log.warning(
                "%s webhook: left out its %s %s, unreadable %s",
                event,
                name,
                item_id(value),
                fields_at_fault(exc),
            )
    needed = next((need for prefix, need in _NEEDS.items() if event.startswith(prefix)), ())
    if needed and not any(name in parts for name in needed):
        what = " or ".join(needed)
        raise WebhookPayloadError(
            f"unexpected {', '.join(unreadable)} in {event}"
            if unreadable
            else f"no {what} in {event}"
        )
    parsed = WebhookEvent(event=event, **parts)
    if parsed.build is not None and parsed.build.pipeline is None and parsed.pipeline is not None:
        # Build events carry the pipeline beside the build, not inside it.
        build = parsed.build.model_copy(update={"pipeline": parsed.pipeline})
        parsed = parsed.model_copy(update={"build": build})
    return parsed


def _verify_signature(
    header: str, body: bytes, secret: str, now: float, tolerance: float
) -> Signature:
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
    return Signature(int(timestamp), signature.lower())


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


# -- plausibility: what a real Buildkite never sends -------------------------------------------


@dataclass(frozen=True)
class Implausible:
    """Why a verified webhook's build cannot be one of ours. `foreign`: it is a real-looking
    build of another organization (ignored), rather than impossible (refused)."""

    reason: str
    foreign: bool = False


def buildkite_hosts(api_url: str) -> tuple[frozenset[str], frozenset[str]]:
    """The hosts a build's `web_url` and `url` may name: Buildkite's own, and those of the
    configured API (`https://api.example.com/v2`: `example.com` and `api.example.com`). A local
    API (a fake, a proxy) adds no web host of its own."""
    host = (urlsplit(api_url).hostname or "").lower()
    web_hosts = {BUILDKITE_WEB_HOST}
    if host.startswith("api.") and urlsplit(api_url).scheme == "https":
        web_hosts.add(host.removeprefix("api."))
    return frozenset(web_hosts), frozenset({BUILDKITE_API_HOST, host} - {""})


def implausible_build(
    build: Build, *, org: str, web_hosts: Collection[str], api_hosts: Collection[str]
) -> Implausible | None:
    """Why `build` is not a build of `org` as Buildkite describes one, if it is not.

    Its `web_url` must be its https page on one of `web_hosts`, and its `url` (when sent) its
    https API address on one of `api_hosts`, both under `org` and for its own number. The build
    number itself is checked by `parse_webhook`.
    """
    try:
        found = [_build_address(build.web_url, web_hosts, _WEB_PATH, "web_url")]
        if build.url:
            found.append(_build_address(build.url, api_hosts, _API_PATH, "url"))
    except ValueError as exc:
        return Implausible(str(exc))
    for address in found:
        if address["org"].casefold() != org.casefold():
            return Implausible(f"a build of organization {address['org'][:100]!r}", foreign=True)
        if int(address["number"]) != build.number:
            return Implausible(f"its URL is build #{address['number']}'s, not #{build.number}'s")
    return None


def _build_address(
    url: str, hosts: Collection[str], path: re.Pattern[str], name: str
) -> dict[str, str]:
    """The parts of a build's URL (org, pipeline, number); ValueError says why it is not one."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise ValueError(f"{name} is not a URL") from None
    if parts.scheme != "https":
        raise ValueError(f"{name} is not https")
    if host not in hosts or parts.username is not None or port not in (None, 443):
        raise ValueError(f"{name} is not on {' or '.join(sorted(hosts))}")
    match = path.search(parts.path)
    if match is None:
        raise ValueError(f"{name} is not a build's address")
    return match.groupdict()
