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

from app.settings import Settings
from app.storage.redis_url import mask_redis_urls, parse_redis_url, url_secrets
from app.storage.redis_url import mask_url as mask_url  # re-exported: the log-facing name

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


#: The loggers of Bolt and slack_sdk (and of the Bolt app, named under them in app.main).
SLACK_LIBRARIES = ("slack_bolt", "slack_sdk")
#: Lines of theirs that quote a Slack request's body, and what is kept of each.
_BODY_LINES = (
    ("Invalid request signature detected", " (body not logged)"),
    ("A global middleware (", " skipped next() (body not logged)"),
    ("Unhandled request (", " (body not logged)"),
)
_BODY_STARTS = ("{", "response_url", "hooks.slack.com", ", body:")
_LIBRARY_LINE_MAX = 300


def without_body(message: str) -> str:
    """A Bolt or slack_sdk log line cut before anything of a request body it quotes.

    Their known lines that quote one are cut after their first words; any other is cut where a
    body would start (a `{`, a response_url) and at 300 characters, a backstop for lines of
    versions not known here.
    """
    for start, note in _BODY_LINES:
        if message.startswith(start):
            return start.rstrip(" (") + note
    cut = min(
        [len(message), _LIBRARY_LINE_MAX] + [i for s in _BODY_STARTS if (i := message.find(s)) >= 0]
    )
    return message if cut == len(message) else message[:cut].rstrip() + " … (cut: body not logged)"


class HideSlackBodies(logging.Filter):
    """Keep Slack request bodies, response_urls above all, out of Bolt's and slack_sdk's lines.

    Their DEBUG lines hold whole request bodies and response_urls, so they are dropped whatever
    LOG_LEVEL says (a handler filter: Bolt copies a logger's level into its own loggers when the
    app is built). Their other lines are kept, cut before any body (`without_body`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(SLACK_LIBRARIES):
            return True
        if record.levelno < logging.INFO:
            return False
        message = record.getMessage()
        shortened = without_body(message)
        if shortened != message:
            record.msg, record.args = shortened, None
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
    handler.addFilter(HideSlackBodies())
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Quieter third parties: their debug lines can echo request headers and bodies.
    for noisy in ("httpx", "httpcore", "aiohttp.access", "mcp", "sse_starlette", *SLACK_LIBRARIES):
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
