"""Exceptions raised by the Buildkite client and by webhook verification.

BuildkiteError
 ├── BuildkiteAPIError           Buildkite answered with a non-2xx status
 │    ├── BadRequest             400
 │    ├── AuthenticationError    401: the API token is wrong or revoked
 │    ├── PermissionDenied       403: the token lacks a scope (``missing_scope``)
 │    ├── NotFound               404
 │    ├── ValidationFailed       422: ``errors`` holds the field details
 │    ├── RateLimited            429: gave up waiting (``reset`` seconds)
 │    └── ServerError            5xx, after retries
 ├── BuildkiteUnavailable        connection error or timeout, after retries
 ├── BuildMaybeStarted          a create or rebuild was maybe sent, and its build not found (yet)
 ├── UnexpectedResponse          a 2xx whose body is not what the endpoint returns
 └── WebhookError
      ├── WebhookVerificationError   the webhook's token or signature did not verify
      └── WebhookPayloadError        the webhook's body is not a payload we understand

No exception text ever contains a token: paths are kept without host or query, and the client
scrubs its token from any message Buildkite echoes back.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "AuthenticationError",
    "BadRequest",
    "BuildMaybeStarted",
    "BuildkiteAPIError",
    "BuildkiteError",
    "BuildkiteUnavailable",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "UnexpectedResponse",
    "ValidationFailed",
    "WebhookError",
    "WebhookPayloadError",
    "WebhookVerificationError",
    "error_for_status",
]


class BuildkiteError(Exception):
    """Base class of everything this package raises on purpose."""


class BuildkiteAPIError(BuildkiteError):
    """Buildkite answered with an error status; ``message`` is its JSON ``message``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        method: str,
        path: str,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        self.status = status
        self.message = message
        self.method = method
        self.path = path
        self.errors: list[dict[str, Any]] = errors or []
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"Buildkite returned {self.status} for {self.method} {self.path}: {self.message}"
        details = _error_details(self.errors)
        return f"{text} ({details})" if details else text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, method={self.method!r}, "
            f"path={self.path!r}, message={self.message!r})"
        )


class BadRequest(BuildkiteAPIError):
    """400: e.g. "Only failed, timed out or canceled jobs can be retried"."""


class AuthenticationError(BuildkiteAPIError):
    """401: the API token is missing, wrong or revoked."""


_SCOPE_RE = re.compile(r"doesn't have the ([a-z_]+) scope")


class PermissionDenied(BuildkiteAPIError):
    """403: usually a missing token scope, named in ``missing_scope`` when Buildkite says which."""

    @property
    def missing_scope(self) -> str | None:
        match = _SCOPE_RE.search(self.message)
        return match.group(1) if match else None


class NotFound(BuildkiteAPIError):
    """404: no such organization, pipeline, build, job or agent (or no access to it)."""


class ValidationFailed(BuildkiteAPIError):
    """422: Buildkite refused the request's content; ``errors`` says which fields."""


class RateLimited(BuildkiteAPIError):
    """429 for longer than the caller was willing to wait."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        method: str,
        path: str,
        errors: list[dict[str, Any]] | None = None,
        reset: float | None = None,
        scope: str | None = None,
    ) -> None:
        self.reset = reset
        #: ``organization`` or ``user``: the rate limit that was exceeded.
        self.scope = scope
        super().__init__(status, message, method=method, path=path, errors=errors)


class ServerError(BuildkiteAPIError):
    """5xx: Buildkite failed, and kept failing through our retries."""


class BuildkiteUnavailable(BuildkiteError):
    """Buildkite could not be reached (connection error or timeout), even after retries."""

    def __init__(
        self, method: str, path: str, *, attempts: int, reason: str, reached: bool = True
    ) -> None:
        self.method = method
        self.path = path
        self.attempts = attempts
        self.reason = reason
        #: False when no connection was made: the request certainly did nothing.
        self.reached = reached
        super().__init__(str(self))

    def __str__(self) -> str:
        tries = "1 attempt" if self.attempts == 1 else f"{self.attempts} attempts"
        return (
            f"Buildkite could not be reached for {self.method} {self.path} "
            f"after {tries}: {self.reason}"
        )

    def __repr__(self) -> str:
        return (
            f"BuildkiteUnavailable(method={self.method!r}, path={self.path!r}, "
            f"attempts={self.attempts}, reason={self.reason!r})"
        )


class BuildMaybeStarted(BuildkiteError):
    """A request that starts a build may have reached Buildkite (it timed out, lost its answer
    or got a 5xx), and no build it started was found in ``waited`` seconds of looking.

    It is never sent again: the build may still appear. ``request_id`` is the create's
    (in the build's meta_data); a rebuild has none, its build names ``rebuilt_from``.
    """

    def __init__(
        self, method: str, path: str, *, reason: str, waited: float, request_id: str | None
    ) -> None:
        self.method = method
        self.path = path
        self.reason = reason
        self.waited = waited
        self.request_id = request_id
        super().__init__(str(self))

    def __str__(self) -> str:
        return (
            f"{self.method} {self.path} may have started a build ({self.reason}); none found "
            f"after looking for {self.waited:.0f} s"
        )

    def __repr__(self) -> str:
        return (
            f"BuildMaybeStarted(method={self.method!r}, path={self.path!r}, "
            f"reason={self.reason!r}, waited={self.waited!r}, request_id={self.request_id!r})"
        )


class UnexpectedResponse(BuildkiteError):
    """A successful answer whose body we cannot read: not JSON, or not the expected shape."""

    def __init__(self, method: str, path: str, reason: str) -> None:
        self.method = method
        self.path = path
        self.reason = reason
        super().__init__(f"Buildkite sent an unexpected answer to {method} {path}: {reason}")


class WebhookError(BuildkiteError):
    """A webhook request we refuse to act on."""


class WebhookVerificationError(WebhookError):
    """The webhook's token or signature is missing, wrong, malformed or too old."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Buildkite webhook rejected: {reason}")


class WebhookPayloadError(WebhookError):
    """The webhook verified, but its body is not JSON or not a payload we understand."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Buildkite webhook payload not understood: {reason}")


_BY_STATUS: dict[int, type[BuildkiteAPIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    422: ValidationFailed,
    429: RateLimited,
}


def error_for_status(status: int) -> type[BuildkiteAPIError]:
    """The exception class for an HTTP error status (the base class for unusual 4xx)."""
    if status >= 500:
        return ServerError
    return _BY_STATUS.get(status, BuildkiteAPIError)


def _error_details(errors: list[dict[str, Any]]) -> str:
    # 422 bodies look like [{"field": "commit", "code": "missing"}]; say "commit missing".
    parts = []
    for item in errors:
        words = [str(item[key]) for key in ("field", "code", "message") if item.get(key)]
        if words:
            parts.append(" ".join(words))
    return ", ".join(parts)
