"""One Buildkite API call over the shared ``httpx.AsyncClient``: the token, the concurrency
limit, 429 waits, retries with backoff, and the rule that a request which may have reached
Buildkite is sent again only when a second copy is harmless."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import metadata
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from buildkite.client.rate_limits import (
    SCOPE_HEADERS,
    RateLimitBudget,
    hit_scope_reset,
    note_rate_limit,
    rate_limit_delay,
)
from buildkite.errors import (
    BuildkiteAPIError,
    BuildkiteUnavailable,
    RateLimited,
    UnexpectedResponse,
    error_for_status,
)

__all__ = ["DEFAULT_MAX_CONCURRENT_REQUESTS", "USER_AGENT", "Transport", "never_sent"]

_MAX_BACKOFF = 30.0
# Requests sent at once. Beyond the HTTP pool's size they would wait in httpcore's queue, whose
# every release rescans the whole queue: a burst of deploys then starves the event loop.
DEFAULT_MAX_CONCURRENT_REQUESTS = 10

Model = TypeVar("Model", bound=BaseModel)

#: Methods whose second copy does what the first did and gets the same answer: reads, and a
#: PATCH of a pipeline's settings. A PUT action (cancel, unblock, retry, stop) or a DELETE sent
#: again after it was done is refused (422, 404), or acts twice.
_SAFE_TO_RESEND = frozenset({"GET", "HEAD", "PATCH"})

#: Failures that mean no connection was made, so the request never left: safe to send again.
#: Any other transport failure (a read or write timeout, a reset or a closed connection) may
#: come after Buildkite received the request.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def never_sent(error: BuildkiteUnavailable) -> bool:
    """True when the failed request certainly never reached Buildkite."""
    return isinstance(error.__cause__, _NEVER_SENT)


def _user_agent() -> str:
    try:
        version = metadata.version("buildkite-slack-chatops")
    except metadata.PackageNotFoundError:
        version = "dev"
    return f"buildkite-slack-chatops/{version} (Slack ChatOps bot) httpx/{httpx.__version__}"


USER_AGENT = _user_agent()


class Transport:
    """Sends API calls to one base URL with one token, and reads their answers."""

    def __init__(
        self,
        token: str | SecretStr,
        *,
        base_url: str,
        http: httpx.AsyncClient | None,
        timeout: float,
        max_retries: int,
        max_rate_limit_wait: float,
        backoff_base: float,
        sleep: Callable[[float], Awaitable[None]],
        max_concurrent_requests: int,
    ) -> None:
        self._token = token if isinstance(token, SecretStr) else SecretStr(token)
        if not self._token.get_secret_value():
            raise ValueError("a Buildkite API token is required")
        if timeout <= 0 or max_retries < 0 or max_rate_limit_wait < 0 or backoff_base < 0:
            raise ValueError("timeout must be positive; retries and waits must not be negative")
        if max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.base = httpx.URL(self.base_url + "/")
        if self.base.scheme not in {"http", "https"} or not self.base.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient()
        self._timeout = httpx.Timeout(timeout)
        self.max_retries = max_retries
        self._max_rate_limit_wait = max_rate_limit_wait
        self._backoff_base = backoff_base
        self.sleep = sleep
        self._slots = asyncio.Semaphore(max_concurrent_requests)
        self._random = random.Random()
        #: The organization's and the token user's budgets, from the latest response that
        #: reported each.
        self.rate_limits: dict[str, RateLimitBudget] = {
            scope: RateLimitBudget(scope) for scope in SCOPE_HEADERS
        }

    async def aclose(self) -> None:
        """Close the HTTP client, unless it was handed to us (its owner closes it)."""
        if self._owns_http:
            await self._http.aclose()

    async def get(self, path: str, model: type[Model]) -> Model:
        """GET ``path`` and read the answer as one ``model``."""
        return self.parse(await self.request("GET", path), model)

    async def request(
        self,
        method: str,
        target: str,
        *,
        params: Sequence[tuple[str, str]] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """Send one API call: wait out 429s, retry transient failures when ``retry``.

        After a failure that may have reached Buildkite (a timeout once sent, a cut connection,
        a 5xx) only a request safe to send twice (``_SAFE_TO_RESEND``) is sent again: an
        unblock, a cancel or a retry of jobs may have been done already, and a second copy
        would be refused, or act twice. Those are sent again only when they certainly never
        left (no connection) or got a 429.

        ``target`` is a path under the base URL, or an absolute URL from a ``Link`` header.
        """
        resend = retry and method.upper() in _SAFE_TO_RESEND
        url = target if target.startswith(("http://", "https://")) else self.base_url + target
        path = self.display_path(url)
        request_headers = {
            "Authorization": f"Bearer {self._token.get_secret_value()}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            **(headers or {}),
        }
        failures = 0
        rate_limit_waited = 0.0
        while True:
            try:
                # Held for the request only, never across a backoff or rate-limit wait.
                async with self._slots:
                    response = await self._http.request(
                        method,
                        url,
                        params=list(params) if params else None,
                        json=json,
                        headers=request_headers,
                        timeout=self._timeout,
                        follow_redirects=follow_redirects,
                    )
            except httpx.TransportError as exc:
                not_sent = isinstance(exc, _NEVER_SENT)
                if (resend or (retry and not_sent)) and failures < self.max_retries:
                    failures += 1
                    await self.sleep(self.backoff(failures))
                    continue
                reason = self._scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
                raise BuildkiteUnavailable(
                    method, path, attempts=failures + 1, reason=reason, reached=not not_sent
                ) from exc
            note_rate_limit(self.rate_limits, response)
            status = response.status_code
            if status == 429:
                # A 429 means Buildkite did nothing, so even a POST is safe to send again.
                delay = rate_limit_delay(response, self._random)
                if rate_limit_waited + delay > self._max_rate_limit_wait:
                    raise self._api_error(response, method, path)
                rate_limit_waited += delay
                await self.sleep(delay)
                continue
            if status >= 500 and resend and failures < self.max_retries:
                failures += 1
                await self.sleep(self.backoff(failures))
                continue
            if response.is_success:
                return response
            raise self._api_error(response, method, path)

    def display_path(self, url: str) -> str:
        """The request path relative to the base URL, without host or query."""
        path = httpx.URL(url).path
        prefix = self.base.path.rstrip("/")
        if prefix and path.startswith(prefix + "/"):
            return path[len(prefix) :]
        return path

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the next try: doubling from ``backoff_base``, plus jitter."""
        delay = self._backoff_base * 2.0 ** (failures - 1)
        return min(delay, _MAX_BACKOFF) + self._random.uniform(0, self._backoff_base)

    def json(self, response: httpx.Response) -> Any:
        """The answer's JSON body; ``UnexpectedResponse`` if it has none."""
        try:
            return response.json()
        except ValueError:
            raise self.unexpected_response(response, "not JSON") from None

    def parse(self, response: httpx.Response, model: type[Model]) -> Model:
        """The answer's JSON body as one ``model``; ``UnexpectedResponse`` if it is not one."""
        item = self.json(response)
        try:
            return model.model_validate(item)
        except ValidationError as exc:
            fields = sorted({".".join(map(str, error["loc"])) for error in exc.errors()})
            reason = f"not a {model.__name__} (bad {', '.join(fields) or 'value'})"
            raise self.unexpected_response(response, reason) from None

    def unexpected_response(self, response: httpx.Response, reason: str) -> UnexpectedResponse:
        """The error for an answer that is not what the endpoint documents."""
        path = self.display_path(str(response.request.url))
        return UnexpectedResponse(response.request.method, path, reason)

    def _api_error(self, response: httpx.Response, method: str, path: str) -> BuildkiteAPIError:
        status = response.status_code
        message = response.reason_phrase or f"HTTP {status}"
        errors: list[dict[str, Any]] = []
        try:
            body = response.json()
        except ValueError:
            body = None  # an HTML error page from a proxy, say
        if isinstance(body, dict):
            if isinstance(body.get("message"), str) and body["message"]:
                message = body["message"]
            if isinstance(body.get("errors"), list):
                errors = [
                    {
                        key: self._scrub(value) if isinstance(value, str) else value
                        for key, value in item.items()
                    }
                    for item in body["errors"]
                    if isinstance(item, dict)
                ]
        message = self._scrub(message)
        if status == 429:
            scope, reset = hit_scope_reset(response)
            return RateLimited(
                status,
                message,
                method=method,
                path=path,
                errors=errors,
                reset=reset,
                scope=scope,
            )
        return error_for_status(status)(status, message, method=method, path=path, errors=errors)

    def _scrub(self, text: str) -> str:
        # Buildkite does not echo tokens, but a proxy or a future message might.
        return text.replace(self._token.get_secret_value(), "[redacted]")
