"""A Redis outage is logged once with its cause, then at most once an interval, with no
tracebacks, and once more when Redis is back; start-up readiness names Redis."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import replace

import pytest

from app.ops.outages import RedisOutage
from app.simulators.bot import FAST, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import RedisServer
from app.simulators.slack import FakeSlack
from tests.test_ops import closed_port
from tests.waiting import wait_until


def _app_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("app.")]


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in _app_records(caplog) if text in r.getMessage()]


async def test_an_outage_is_logged_once_and_its_end_once(
    slack: FakeSlack, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = RedisServer()  # not started yet: Redis is down when the bot starts
    try:
        async with running_bot(slack, bk, server.url):
            # The notifier, poller and approval sweep each fail several times meanwhile.
            await asyncio.sleep(2.5)
            await wait_until(
                lambda: _lines(caplog, "redis unavailable") and _lines(caplog, "not ready: redis"),
                timeout=30,
                what="the outage logged",
            )
            down = _lines(caplog, "redis unavailable")
            assert len(down) == 1, down
            assert server.url.split("//")[1].split("/")[0] in down[0]  # names the server
            assert "ConnectionError" in down[0]  # and the cause
            assert _lines(caplog, "redis still down") == []  # within the minute: silent
            assert _lines(caplog, "not ready: redis") != []  # start-up names it
            server.start()
            await wait_until(
                lambda: _lines(caplog, "redis is back"), timeout=30, what="its end logged"
            )
            await asyncio.sleep(0.5)  # every loop has succeeded since
    finally:
        server.stop()
    assert len(_lines(caplog, "redis is back")) == 1
    assert len(_lines(caplog, "redis unavailable")) == 1
    assert [r.getMessage() for r in _app_records(caplog) if r.exc_info] == []
    assert not [
        r
        for r in _app_records(caplog)
        if r.levelno >= logging.ERROR
        and "redis" in r.getMessage().lower()
        and "not ready" not in r.getMessage()
    ]


async def test_a_long_outage_repeats_at_most_once_an_interval_without_the_password(
    slack: FakeSlack, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    tuning = replace(FAST, redis_outage_log_every=0.5)
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    async with running_bot(slack, bk, url, tuning=tuning):
        # Its loops fail every few tens of ms all along: a line for each would be dozens.
        await wait_until(
            lambda: len(_lines(caplog, "redis still down")) >= 3, timeout=30, what="repeats"
        )
    down = _lines(caplog, "redis unavailable")
    still = _lines(caplog, "redis still down")
    assert len(down) == 1 and "***" in down[0]
    # At most one line an interval, however slowly this machine ran (the records' own times).
    outage = [
        r.created
        for r in _app_records(caplog)
        if "redis unavailable" in r.getMessage() or "redis still down" in r.getMessage()
    ]
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(outage)), (outage, still)
    assert not any("hunter2" in r.getMessage() for r in caplog.records)
    assert [r.getMessage() for r in _app_records(caplog) if r.exc_info] == []


def test_the_tracker_rate_limits_and_forgets_a_finished_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.ops.outages")
    now = [0.0]
    outage = RedisOutage("redis://host:6379/0", repeat_every=60.0, clock=lambda: now[0])
    outage.recovered()  # no outage: nothing to say
    for second in range(0, 130, 1):
        now[0] = float(second)
        outage.failed(ConnectionError("refused"), "polling")
    now[0] = 130.0
    outage.recovered()
    outage.recovered()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4, messages  # start, after 60 s, after 120 s, back
    assert "redis unavailable at redis://host:6379/0: ConnectionError: refused" in messages[0]
    assert messages[1].startswith("redis still down at redis://host:6379/0 after 60 s")
    assert messages[3] == "redis is back at redis://host:6379/0 after 130 s"
    assert not outage.down
