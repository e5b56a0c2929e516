"""Buildkite's two rate-limit scopes: reading their headers and 429 bodies, and how long a
429 makes the next request wait."""

from __future__ import annotations

import random

import httpx

__all__ = [
    "ORGANIZATION_SCOPE",
    "SCOPE_HEADERS",
    "USER_SCOPE",
    "RateLimitBudget",
    "hit_scope_reset",
    "note_rate_limit",
    "rate_limit_delay",
]

# Buildkite's window is 60 s, so a longer wait for one 429 would only mean a bad header.
_MAX_RATE_LIMIT_WAIT_EACH = 60.0

#: Buildkite's two rate-limit scopes, the headers each is reported in, and the ``scope`` a 429
#: body names when it is the one exceeded.
ORGANIZATION_SCOPE = "organization"
USER_SCOPE = "user"
SCOPE_HEADERS = {ORGANIZATION_SCOPE: "RateLimit-", USER_SCOPE: "RateLimit-User-"}
_BODY_SCOPES = {"rest": ORGANIZATION_SCOPE, "rest_user": USER_SCOPE}


class RateLimitBudget:
    """One rate-limit scope as Buildkite's latest answer reported it (reset in seconds)."""

    __slots__ = ("limit", "remaining", "reset", "scope")

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.remaining: int | None = None
        self.limit: int | None = None
        self.reset: float | None = None

    def __repr__(self) -> str:
        return (
            f"RateLimitBudget({self.scope!r}, remaining={self.remaining}, limit={self.limit}, "
            f"reset={self.reset})"
        )


def rate_limit_delay(response: httpx.Response, rng: random.Random) -> float:
    """Seconds to wait after this 429: its scope's reset (capped) plus jitter."""
    reset = hit_scope_reset(response)[1]
    if reset is None:
        reset = _MAX_RATE_LIMIT_WAIT_EACH
    reset = min(max(reset, 0.0), _MAX_RATE_LIMIT_WAIT_EACH)
    return reset + 0.5 + rng.uniform(0, 1)


def note_rate_limit(budgets: dict[str, RateLimitBudget], response: httpx.Response) -> None:
    """Update ``budgets`` (one per scope) from what ``response`` reports."""
    for scope, prefix in SCOPE_HEADERS.items():
        budget = budgets[scope]
        remaining = _float_header(response, f"{prefix}Remaining")
        if remaining is not None:
            budget.remaining = int(remaining)
        limit = _float_header(response, f"{prefix}Limit")
        if limit is not None:
            budget.limit = int(limit)
        reset = _float_header(response, f"{prefix}Reset")
        if reset is not None:
            budget.reset = reset
    if response.status_code == 429:
        scope, reset = hit_scope_reset(response)
        budget = budgets[scope]
        budget.remaining = 0
        if reset is not None:
            budget.reset = reset


def hit_scope_reset(response: httpx.Response) -> tuple[str, float | None]:
    """Which scope a 429 exceeded and its seconds to reset: the body's ``scope`` and
    ``reset`` first, then the headers of the scope that has nothing left."""
    body_scope, body_reset = _rate_limit_body(response)
    scope = body_scope
    if scope is None:
        exhausted = [
            name
            for name, prefix in SCOPE_HEADERS.items()
            if _float_header(response, f"{prefix}Remaining") == 0
        ]
        scope = exhausted[-1] if exhausted else ORGANIZATION_SCOPE
    if body_reset is not None:
        return scope, body_reset
    return scope, _float_header(response, f"{SCOPE_HEADERS[scope]}Reset")


def _float_header(response: httpx.Response, name: str) -> float | None:
    try:
        return float(response.headers[name])
    except (KeyError, ValueError):
        return None


def _rate_limit_body(response: httpx.Response) -> tuple[str | None, float | None]:
    """The scope (``organization`` or ``user``) and ``reset`` a 429 body names, if any."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    named = body.get("scope")
    scope = _BODY_SCOPES.get(named) if isinstance(named, str) else None
    value = body.get("reset")
    reset = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return scope, reset
