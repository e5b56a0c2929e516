"""Items 3, 4 (and 5 under webhooks): webhook-to-Slack latency, and the bot's footprint.

The bot runs in a child process (as `python -m app` would, on a real port, redis-server behind
it); the Slack and Buildkite fakes run in this process, which also sends the requests, so a
webhook's send time and the moment its `chat.update` reaches the fake are read on one clock.
The baseline is the bare relay of `bench.serve` (verify, then one `chat.update`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as redis

from app.simulators import slack_requests
from app.simulators.buildkite import sign_webhook
from app.simulators.slack import FakeSlack, RecordedCall
from app.storage.keys import EVENTS_STREAM, PREFIX
from app.storage.store import Store
from bench.common import (
    SIGNING_SECRET,
    WEBHOOK_TOKEN,
    Child,
    median,
    percentile,
    rss_mb,
    unexpected,
)
from bench.polling import rate_budget

PIPELINES = [f"svc-{n}" for n in range(20)]
WINDOWS = 5


async def sample_rss(pid: int, samples: int = 5, every: float = 0.2) -> float:
    values = []
    for _ in range(samples):
        values.append(rss_mb(pid))
        await asyncio.sleep(every)
    return median(values)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for(predicate: Any, what: str, timeout: float = 120.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def key_report(client: redis.Redis) -> dict[str, Any]:
    """Bytes (MEMORY USAGE, every element counted) and TTLs of the bot's keys, by kind."""
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    no_ttl: list[str] = []
    longest: dict[str, int] = {}
    async for raw in client.scan_iter(match=PREFIX + "*", count=1000):
        key = raw.decode()
        kind = key[len(PREFIX) :].split(":")[0]
        usage = await client.memory_usage(key, samples=0)
        ttl = await client.ttl(key)
        sizes[kind] += int(usage or 0)
        counts[kind] += 1
        if ttl == -1:
            no_ttl.append(key)
        else:
            longest[kind] = max(longest.get(kind, 0), ttl)
    return {
        "bytes": dict(sizes),
        "keys": dict(counts),
        "no_ttl": sorted(no_ttl),
        "longest_ttl_days": {k: round(v / 86400, 1) for k, v in longest.items()},
    }


class Sender:
    """Signed Slack commands and Buildkite webhooks to one server, open loop."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.answered: set[str] = set()
        self._read = 0

    async def deploy(self, slack: FakeSlack, index: int, channel: str) -> None:
        """/deploy, and wait for its answer ("Started ..."), so deploys do not pile up."""
        name = f"w{index}"
        body, headers = slack_requests.slash_command(
            "/deploy",
            PIPELINES[index % len(PIPELINES)],
            response_url=slack.response_url(name),
            signing_secret=SIGNING_SECRET,
            channel_id=channel,
        )
        async with self.session.post(
            f"{self.base}/slack/events", data=body, headers=headers
        ) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"/deploy answered {response.status}")

        async def answered() -> bool:
            self._seen_answers(slack)
            return name in self.answered

        await wait_for(answered, f"the answer to /deploy #{index}")

    def _seen_answers(self, slack: FakeSlack) -> None:
        """Names of the response_urls answered so far (read once each, not on every check)."""
        for post in slack.responses[self._read :]:
            self.answered.add(post.name)
        self._read = len(slack.responses)

    async def webhook(self, payload: dict[str, Any]) -> tuple[float, int]:
        """Send one signed webhook; returns when it was sent (time.monotonic()) and the status."""
        body = json.dumps(payload).encode()
        headers = sign_webhook(body, WEBHOOK_TOKEN, event=payload["event"])
        headers["Content-Type"] = "application/json"
        sent = time.monotonic()
        async with self.session.post(
            f"{self.base}/buildkite/webhook", data=body, headers=headers
        ) as response:
            await response.read()
            return sent, response.status


async def paced(jobs: list[Any], rate: float) -> list[Any]:
    """Start one coroutine factory every 1/rate seconds, without waiting for the previous."""
    start = time.monotonic()
    tasks = []
    for index, job in enumerate(jobs):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(job()))
    return list(await asyncio.gather(*tasks))


def update_latencies(
    calls: list[RecordedCall], sent: dict[str, float], want: str | None
) -> dict[str, float]:
    """Per message ts (in sending order): first chat.update after its webhook was sent; the
    latencies' percentiles, and how many of these updates reached Slack per second."""
    first: dict[str, float] = {}
    for call in calls:
        ts = str(call.args.get("ts"))
        if call.method != "chat.update" or not call.ok or ts not in sent or ts in first:
            continue
        if call.time < sent[ts]:
            continue
        if want is not None and want not in json.dumps(call.args.get("blocks") or call.args):
            continue
        first[ts] = call.time
    refused = {ts for ts, moment in sent.items() if math.isnan(moment)}
    missing = [ts for ts in sent if ts not in first and ts not in refused]
    if missing:
        raise RuntimeError(f"{len(missing)} messages were never updated")
    latencies = [(first[ts] - sent[ts]) * 1000 for ts in sent if ts not in refused]
    span = max(first.values()) - min(first.values())
    return {**windowed(latencies), "updates_per_second": len(first) / span if span else math.nan}


def windowed(latencies: list[float]) -> dict[str, float]:
    size = max(len(latencies) // WINDOWS, 1)
    windows = [latencies[i : i + size] for i in range(0, size * WINDOWS, size)]
    windows = [w for w in windows if w]
    return {
        "p50_ms": median([percentile(w, 50) for w in windows]),
        "p99_ms": median([percentile(w, 99) for w in windows]),
        "max_ms": max(latencies),
        "webhooks": len(latencies),
    }


class Buildkite:
    """The Buildkite fake in its child process, driven through its control routes."""

    def __init__(self, session: aiohttp.ClientSession, control: str) -> None:
        self.session = session
        self.control = control

    async def payload(self, slug: str, number: int, state: str | None = None) -> dict[str, Any]:
        """The build's webhook body (after moving it to `state`)."""
        body = {"slug": slug, "number": number, "state": state}
        async with self.session.post(f"{self.control}/payload", json=body) as response:
            result: dict[str, Any] = await response.json()
            return result

    async def builds(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.control}/builds") as response:
            result: list[dict[str, Any]] = await response.json()
            return result


async def run(
    redis_url: str, *, builds: int, rate: float = 100.0, burst: int = 100
) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    store = Store(client)
    out: dict[str, Any] = {"builds": builds, "rate": rate, "refused": 0}
    async with (
        FakeSlack() as slack,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session,
    ):
        fake = Child("buildkite", {"pipelines": PIPELINES})
        info = await fake.start()
        bk = Buildkite(session, info["control"])
        config = {
            "slack_api_url": slack.api_url,
            "slack_hooks_url": slack.hooks_url,
            "bk_url": info["bk_url"],
            "redis_url": redis_url,
        }
        bare, bot = Child("bare", config), Child("bot", config)
        try:
            await bare.start()
            await asyncio.sleep(2.0)
            out["bare_rss_idle_mb"] = await sample_rss(bare.pid)
            await bot.start()
            await asyncio.sleep(2.0)
            out["rss_idle_mb"] = await sample_rss(bot.pid)
            sender = Sender(session, bot.info["port"])

            async def deploy_all(prefix: str, count: int, offset: int) -> list[tuple[str, str]]:
                """/deploy `count` builds, one channel each; (channel, ts) of their messages."""
                channels = [f"{prefix}{i:04d}" for i in range(count)]
                gate = asyncio.Semaphore(10)

                async def one(index: int) -> None:
                    async with gate:
                        await sender.deploy(slack, offset + index, channels[index])

                await asyncio.gather(*(one(i) for i in range(count)))

                wanted, read = set(channels), 0
                roots: dict[str, str] = {}

                async def posted() -> bool:
                    nonlocal read
                    for call in slack.calls[read:]:
                        channel = call.args.get("channel")
                        if call.method == "chat.postMessage" and call.ok and channel in wanted:
                            roots.setdefault(channel, str(call.response["ts"]))
                    read = len(slack.calls)
                    return len(roots) >= count

                await wait_for(posted, f"{count} build messages")
                return [(c, roots[c]) for c in channels]

            #: message ts -> (pipeline, number, build id, size of the build's JSON)
            builds_by_ts: dict[str, tuple[str, int, str, int]] = {}

            async def learn_builds() -> None:
                for build in await bk.builds():
                    tracked = await store.get(build["id"])
                    if tracked is not None and tracked.targets and tracked.targets[0].ts:
                        builds_by_ts[tracked.targets[0].ts] = (
                            tracked.pipeline,
                            tracked.number,
                            build["id"],
                            build["bytes"],
                        )

            async def send(ts: str, state: str | None, to: Sender) -> tuple[str, float]:
                slug, number, _, _ = builds_by_ts[ts]
                sent, status = await to.webhook(await bk.payload(slug, number, state))
                if status != 200:
                    out["refused"] += 1
                    return ts, math.nan
                return ts, sent

            async def drained() -> bool:
                return int(await client.xlen(EVENTS_STREAM)) == 0

            phases = out["phase_seconds"] = {}
            mark = time.monotonic()

            def phase(name: str) -> None:
                nonlocal mark
                phases[name] = round(time.monotonic() - mark, 1)
                mark = time.monotonic()

            messages = await deploy_all("CHOOK", builds, 0)
            await learn_builds()
            phase("deploy")

            await paced([lambda ts=ts: send(ts, "running", sender) for _, ts in messages], rate)
            await wait_for(drained, "the running updates", timeout=300)
            phase("running")
            await asyncio.sleep(2.0)
            out["rss_tracked_mb"] = await sample_rss(bot.pid)
            out["redis_tracked"] = await key_report(client)
            out["build_json_bytes"] = median([builds_by_ts[ts][3] for _, ts in messages])

            first_call = len(slack.calls)
            # The bot's CPU per webhook: steadier than its latency on a shared machine.
            cpu_before, started = cpu_seconds(bot.pid), time.monotonic()
            sent = dict(
                await paced([lambda ts=ts: send(ts, "passed", sender) for _, ts in messages], rate)
            )
            await wait_for(drained, "the finished updates", timeout=300)
            cpu_used, took = cpu_seconds(bot.pid) - cpu_before, time.monotonic() - started
            phase("finished")
            out["bot"] = update_latencies(slack.calls[first_call:], sent, "Passed")
            out["bot"]["cpu_ms_per_webhook"] = cpu_used * 1000 / builds
            out["bot"]["cpu_share"] = cpu_used / took
            out["redis_final"] = await key_report(client)
            out["pending_after"] = await store.pending_count()

            # Item 5 under webhooks: three states 100 ms apart per build, 100 webhooks/s.
            burst_first = len(slack.calls)
            bursts = await deploy_all("CBURST", burst, builds)
            await learn_builds()
            # In groups of 10 builds, so that each build's three webhooks are 100 ms apart.
            jobs = [
                lambda ts=ts, state=state: send(ts, state, sender)
                for group in range(0, len(bursts), 10)
                for state in ("running", "failing", "failed")
                for _, ts in bursts[group : group + 10]
            ]
            await paced(jobs, rate)
            await wait_for(drained, "the burst updates", timeout=300)
            await asyncio.sleep(1.5)  # coalesced edits still in the outbox
            phase("burst")
            burst_calls = slack.calls[burst_first:]
            edits = [c for c in burst_calls if c.method == "chat.update" and c.ok]
            posts = [c for c in burst_calls if c.method == "chat.postMessage" and c.ok]
            out["burst"] = {
                "builds": burst,
                "edits": len(edits),
                "posts": len(posts),
                "edit_gap_min": rate_budget(edits, "message")[0],
                "max_edits_per_message_second": rate_budget(edits, "message")[1],
                "post_gap_min": rate_budget(posts, "channel")[0],
                "max_posts_per_channel_second": rate_budget(posts, "channel")[1],
            }
            out["bot_error_log_lines"] = bot.error_lines()
            await bot.stop()

            # The baseline relay: the same webhooks, at the same rate, for the same messages.
            relay = Sender(session, bare.info["port"])
            targets = {builds_by_ts[ts][2]: (channel, ts) for channel, ts in messages}
            async with session.post(f"{relay.base}/_bench/targets", json=targets) as response:
                await response.read()
            first_call = len(slack.calls)
            sent = dict(
                await paced([lambda ts=ts: send(ts, None, relay) for _, ts in messages], rate)
            )
            out["bare"] = update_latencies(slack.calls[first_call:], sent, None)
            phase("bare")
        except BaseException:
            print(f"bot log, last lines:\n{bot.tail()}", file=sys.stderr)
            raise
        finally:
            await bot.stop()
            await bare.stop()
            out["buildkite"] = await fake.stop()
            for process in (bot, bare, fake):
                process.log.unlink(missing_ok=True)
        if problems := unexpected(slack):
            raise RuntimeError(f"unexpected requests: {problems[:3]}")
    await client.aclose()
    return out
