"""Logging set-up: plain lines on a terminal, JSON lines otherwise, secrets always masked.

Every line logged while the bot handles one request carries that request's correlation id, which
is also the reference shown to the user when something goes wrong.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

from app.redis_url import mask_redis_urls, parse_redis_url, url_secrets
from app.redis_url import mask_url as mask_url  # re-exported: the log-facing name
from app.settings import Settings

_correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)


def new_correlation_id() -> str:
    """Start a request: a fresh id for every log line (and error reference) that follows."""
    correlation_id = uuid.uuid4().hex[:8]
    _correlation_id.set(correlation_id)
    return correlation_id


def current_correlation_id() -> str | None:
    """The id of the request being handled, or None outside any request."""
    return _correlation_id.get()


def url_password(url: str | None) -> str | None:
    """The password in a REDIS_URL (userinfo or `?password=`), if there is one."""
    if not url:
        return None
    try:
        target = parse_redis_url(url)
    except ValueError:
        return None
    return target.password


class RedactSecrets(logging.Filter):
    """Replace every known secret value in a log record's final text with `***`, and the
    password of any Redis URL in it, known or not (a safety net for what the bot did not log
    itself: a library's message, an exception's text)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return mask_redis_urls(text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        if record.stack_info:
            message += "\n" + record.stack_info
            record.stack_info = None
        record.msg, record.args = self.redact(message), None
        return True


class AddCorrelationId(logging.Filter):
    """Stamp each record with the correlation id of the request it was logged in."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = _correlation_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation_id = getattr(record, "correlation_id", None)
        if correlation_id:
            entry["correlation_id"] = correlation_id
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        correlation_id = getattr(record, "correlation_id", None)
        return f"{line} [{correlation_id}]" if correlation_id else line


def configure(level: str, secrets: Iterable[str], stream: TextIO | None = None) -> None:
    """Send every log line to `stream` (stderr): JSON unless it is a terminal, secrets masked."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if stream.isatty() else JsonFormatter())
    handler.addFilter(AddCorrelationId())
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Quieter third parties: their debug lines can echo request headers.
    for noisy in ("httpx", "httpcore", "aiohttp.access", "slack_sdk", "slack_bolt"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, for `RedactSecrets`."""
    values = [
        s.get_secret_value()
        for s in (
            settings.slack_bot_token,
            settings.slack_signing_secret,
            settings.slack_app_token,
            settings.buildkite_api_token,
            settings.buildkite_webhook_token,
        )
        if s is not None
    ]
    return values + url_secrets(settings.redis_url)
