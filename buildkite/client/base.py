"""What every group of endpoints shares: the constructor, the transport, the rate-limit
budgets, and the validated paths of the organization's resources."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Self
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from buildkite.client.rate_limits import RateLimitBudget
from buildkite.client.starts import StartLookup
from buildkite.client.transport import DEFAULT_MAX_CONCURRENT_REQUESTS, Transport

__all__ = ["DEFAULT_BASE_URL", "ClientBase", "identifier", "iso8601", "slug"]

DEFAULT_BASE_URL = "https://api.buildkite.com/v2"

# Slugs and ids are validated, not just quoted, so a value can never address another resource.
_SLUG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


class ClientBase:
    """Buildkite REST API v2 for one organization, over one shared ``httpx.AsyncClient``."""

    def __init__(
        self,
        token: str | SecretStr,
        org: str,
        *,
        base_url: str = DEFAULT_BASE_URL,
        http: httpx.AsyncClient | None = None,
        timeout: float = 15.0,
        max_retries: int = 3,
        max_rate_limit_wait: float = 60.0,
        backoff_base: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        start_lookup: StartLookup | None = None,
    ) -> None:
        """``max_concurrent_requests`` should not exceed the pool size of ``http``; the others
        wait their turn, first come first served."""
        # Before the transport, which may open an HTTP client that a bad slug would leak.
        self.org = slug(org, "organization")
        self._transport = Transport(
            token,
            base_url=base_url,
            http=http,
            timeout=timeout,
            max_retries=max_retries,
            max_rate_limit_wait=max_rate_limit_wait,
            backoff_base=backoff_base,
            sleep=sleep,
            max_concurrent_requests=max_concurrent_requests,
        )
        self.base_url = self._transport.base_url
        #: The organization's (``RateLimit-*``) and the token user's (``RateLimit-User-*``)
        #: budgets, from the latest response that reported each, for callers that pace
        #: themselves, like the poller.
        self.rate_limits: dict[str, RateLimitBudget] = self._transport.rate_limits
        #: How long a create or rebuild without an answer is looked for (see ``starts``).
        self.start_lookup = start_lookup or StartLookup()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(org={self.org!r}, base_url={self.base_url!r})"

    @property
    def tighter_rate_limit(self) -> RateLimitBudget | None:
        """The scope with the fewest requests left (either scope's 429 stops every call)."""
        known = [b for b in self.rate_limits.values() if b.remaining is not None]
        return min(known, key=lambda b: b.remaining or 0, default=None)

    @property
    def rate_limit_remaining(self) -> int | None:
        """Requests left in the tighter of the two scopes."""
        budget = self.tighter_rate_limit
        return budget.remaining if budget else None

    @property
    def rate_limit_limit(self) -> int | None:
        budget = self.tighter_rate_limit
        return budget.limit if budget else None

    @property
    def rate_limit_reset(self) -> float | None:
        budget = self.tighter_rate_limit
        return budget.reset if budget else None

    async def aclose(self) -> None:
        """Close the HTTP client, unless it was handed to us (its owner closes it)."""
        await self._transport.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Paths

    @property
    def _org_path(self) -> str:
        return f"/organizations/{quote(self.org, safe='')}"

    def _pipeline_path(self, pipeline: str) -> str:
        return f"{self._org_path}/pipelines/{quote(slug(pipeline, 'pipeline'), safe='')}"

    def _build_path(self, pipeline: str, number: int) -> str:
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(f"a build number must be a positive int, got {number!r}")
        return f"{self._pipeline_path(pipeline)}/builds/{number}"

    def _job_path(self, pipeline: str, number: int, job_id: str) -> str:
        job = quote(identifier(job_id, "job id"), safe="")
        return f"{self._build_path(pipeline, number)}/jobs/{job}"

    def _agent_path(self, agent_id: str) -> str:
        return f"{self._org_path}/agents/{quote(identifier(agent_id, 'agent id'), safe='')}"


def slug(value: str, what: str) -> str:
    """``value`` if it is a valid slug, else ``ValueError`` naming ``what`` it was meant to be."""
    if not isinstance(value, str) or not _SLUG_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"invalid {what} slug {value!r}")
    return value


def identifier(value: str, what: str) -> str:
    """``value`` if it is a valid id, else ``ValueError`` naming ``what`` it was meant to be."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def iso8601(moment: datetime) -> str:
    """``moment`` in UTC as Buildkite's filters take it; a naive one is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
