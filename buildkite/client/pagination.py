"""Listing endpoints as async iterators that follow ``Link: <...>; rel="next"`` page by page."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
from pydantic import ValidationError

from buildkite.client.transport import Model, Transport
from buildkite.errors import BuildkiteError
from buildkite.models import fields_at_fault, item_id

__all__ = ["MAX_PER_PAGE", "paginate"]

log = logging.getLogger(__name__)

MAX_PER_PAGE = 100


def paginate(
    transport: Transport,
    path: str,
    params: list[tuple[str, str]],
    model: type[Model],
    *,
    per_page: int,
    limit: int | None,
) -> AsyncIterator[Model]:
    """Every ``model`` listed at ``path``, across pages, up to ``limit`` of them."""
    # Validated here, not in the generator, so a bad call fails where it is made.
    if isinstance(per_page, bool) or per_page < 1:
        raise ValueError("per_page must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    # No point fetching 100 builds to keep 5.
    per_page = min(per_page, MAX_PER_PAGE, limit or MAX_PER_PAGE)
    return _pages(transport, path, [*params, ("per_page", str(per_page))], model, limit)


async def _pages(
    transport: Transport,
    path: str,
    params: list[tuple[str, str]],
    model: type[Model],
    limit: int | None,
) -> AsyncIterator[Model]:
    if limit == 0:
        return
    target: str | None = path
    query: list[tuple[str, str]] | None = params
    count = 0
    while target is not None:
        response = await transport.request("GET", target, params=query)
        query = None  # the next link carries the whole query
        items = transport.json(response)
        if not isinstance(items, list):
            raise transport.unexpected_response(response, "not a JSON list")
        for item in items:
            try:
                parsed = model.model_validate(item)
            except ValidationError as exc:
                # One odd item must not hide the page around it.
                log.warning(
                    "skipped %s %s listed by %s: unreadable %s",
                    model.__name__.lower(),
                    item_id(item),
                    transport.display_path(str(response.request.url)),
                    fields_at_fault(exc),
                )
                continue
            yield parsed
            count += 1
            if limit is not None and count >= limit:
                return
        target = _next_link(transport.base, response)


def _next_link(base: httpx.URL, response: httpx.Response) -> str | None:
    url = response.links.get("next", {}).get("url")
    if not url:
        return None
    next_url = base.join(url)
    # The next request carries our token: never send it anywhere but Buildkite.
    if (next_url.scheme, next_url.host, next_url.port) != (base.scheme, base.host, base.port):
        raise BuildkiteError(f"refusing to follow a pagination link to {next_url.host}")
    return str(next_url)
