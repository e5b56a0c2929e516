"""Item 1: how fast a signed `/deploy` is acknowledged, next to a bare Bolt app that only acks.

Four processes: this one generates the load (50 closed-loop clients over loopback), the server
under test runs in a child (the bot, then the bare app), the Slack and Buildkite fakes in another
child (Buildkite answering every request after 300 ms), and redis-server.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import redis.asyncio as redis

from app.simulators import slack_requests
from bench.common import SIGNING_SECRET, Child, child, median, percentile

PIPELINES = [f"svc-{n}" for n in range(20)]
CHANNELS = 200
RESPONSE_URLS = 100_000
WINDOW = 5.0
WARMUP = 1.0


@dataclass
class Load:
    """What one server did under the load: latencies (ms) per window, and failures."""

    windows: list[list[float]] = field(default_factory=list)
    failed: int = 0
    seconds: float = 0.0
    #: Acks that put the deploy in line, or refused it (the bot's deploy queue was full).
    queued: int = 0
    refused: int = 0

    @property
    def done(self) -> int:
        return sum(len(w) for w in self.windows)

    def summary(self) -> dict[str, float]:
        """Medians over the windows of each window's p50, p99 and throughput."""
        full = [w for w in self.windows if w]
        return {
            "p50_ms": median([percentile(w, 50) for w in full]),
            "p99_ms": median([percentile(w, 99) for w in full]),
            "throughput": median([len(w) / WINDOW for w in full]),
            "requests": self.done,
            "failed": self.failed,
            "queued": self.queued,
            "refused": self.refused,
            "windows": len(full),
        }


async def generate(url: str, slack_base: str, *, clients: int, seconds: float) -> Load:
    """`clients` concurrent clients, each sending a signed /deploy as soon as the last is acked."""
    load = Load(windows=[[] for _ in range(int(seconds // WINDOW))], seconds=seconds)
    counter = itertools.count()
    start = time.perf_counter() + WARMUP
    end = start + len(load.windows) * WINDOW

    async def client(session: aiohttp.ClientSession) -> None:
        while (now := time.perf_counter()) < end:
            n = next(counter)
            body, headers = slack_requests.slash_command(
                "/deploy",
                PIPELINES[n % len(PIPELINES)],
                response_url=f"{slack_base}/response/r{n % RESPONSE_URLS}",
                signing_secret=SIGNING_SECRET,
                channel_id=f"CBENCH{n % CHANNELS:04d}",
                channel_name=f"bench-{n % CHANNELS}",
            )
            sent = time.perf_counter()
            answer = b""
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            took = (time.perf_counter() - sent) * 1000
            if now < start:
                continue
            if not ok:
                load.failed += 1
                continue
            load.queued += b" in line " in answer
            load.refused += b"Too many deploys" in answer
            index = int((sent - start) // WINDOW)
            if index < len(load.windows):
                load.windows[index].append(took)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return load


async def run(redis_url: str, *, seconds: float, clients: int = 50) -> dict[str, Any]:
    """Ack latency of the bare app, then of the bot, under the same load."""
    config = {"latency": 0.3, "pipelines": PIPELINES, "response_urls": RESPONSE_URLS}
    results: dict[str, Any] = {}
    fakes = Child("fakes", config)
    info = await fakes.start()
    try:
        for role in ("bare", "bot"):
            client = redis.Redis.from_url(redis_url)
            await client.flushdb()
            await client.aclose()
            server_config = {
                "slack_api_url": info["slack_api_url"],
                "slack_hooks_url": info["slack_hooks_url"],
                "bk_url": info["bk_url"],
                "redis_url": redis_url,
            }
            async with child(role, server_config) as server:
                url = f"http://127.0.0.1:{server.info['port']}/slack/events"
                load = await generate(url, info["slack_base"], clients=clients, seconds=seconds)
                results[role] = load.summary()
                if role == "bot":
                    results[role]["error_log_lines"] = server.error_lines()
    finally:
        results["fakes"] = await fakes.stop(grace=15.0)
        fakes.log.unlink(missing_ok=True)
    return results
