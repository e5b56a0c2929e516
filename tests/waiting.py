"""Waiting for a condition with a deadline, for the tests that poll something other than the
fake Slack (Redis keys, log records, a bot's state): never sleep-and-hope on a loaded machine."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float,  # noqa: ASYNC109
    what: str,
    describe: Callable[[], str] = ...,
) -> T: ...


@overload
async def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,  # noqa: ASYNC109
    what: str,
    describe: Callable[[], str] = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,  # noqa: ASYNC109
    what: str,
    describe: Callable[[], str] = lambda: "",
) -> Any:
    """Poll `predicate` until it is truthy; fail after `timeout` s saying what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{describe()}")
        await asyncio.sleep(0.05)
