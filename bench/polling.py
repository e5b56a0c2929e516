"""Item 2 (and 5): Buildkite requests per tracked build, and the lag from a build's end to Slack.

1,000 builds are in flight; each finishes at a random time within the window. The real tracker
(`open_services`: store on redis-server, Buildkite client, outbox, notifier) runs against the
Slack and Buildkite fakes in this process, in *simulated time*: the tracker's clock is a real
clock plus an offset, and between two polls the offset jumps over the poll interval instead of
waiting it out. Everything the bot really does (pages parsed, Redis scripts, Slack writes and
their pacing) takes its real time, which the simulated clock includes; each Buildkite request
takes 0.3 s of simulated time (Buildkite's latency), not the time the fake took to answer.

The naive baseline (GET every tracked build every 10 s) is computed from the same finish times.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import httpx
import redis.asyncio as redis

from app.main import open_services
from app.settings import Settings
from app.simulators.buildkite import FakeBuildkite, sign_webhook
from app.simulators.slack import FakeSlack, RecordedCall
from app.storage.keys import EVENTS_STREAM, POLL_LEASE_KEY
from app.tracking.poller import next_poll_at
from bench.common import (
    BUILDKITE_TOKEN,
    SIGNING_SECRET,
    USER,
    WEBHOOK_TOKEN,
    unexpected,
)
from buildkite.client import REQUEST_ID_META_KEY, SOURCE_META_KEY, SOURCE_META_VALUE
from buildkite.models import Build
from buildkite.webhooks import parse_webhook, verify_webhook

#: The bot's default POLL_INTERVAL.
POLL_INTERVAL = float(Settings.model_fields["poll_interval"].default)
BUILDKITE_LATENCY = 0.3
NAIVE_INTERVAL = 10.0
PIPELINES = [f"svc-{n}" for n in range(20)]


class SimClock:
    """Real time plus an offset that jumps forward; maps real instants back to simulated ones."""

    def __init__(self) -> None:
        offset = time.time() - time.monotonic()
        self._jumps: list[tuple[float, float]] = [(float("-inf"), offset)]

    @property
    def offset(self) -> float:
        return self._jumps[-1][1]

    def now(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self._jumps.append((time.monotonic(), self.offset + seconds))

    def jump_to(self, moment: float) -> None:
        if moment > self.now():
            self.advance(moment - self.now())

    def at(self, monotonic: float) -> float:
        """The simulated time of a real `time.monotonic()` instant (e.g. a recorded call)."""
        offset = self._jumps[0][1]
        for since, value in self._jumps:
            if since > monotonic:
                break
            offset = value
        return monotonic + offset

    def datetime(self, moment: float | None = None) -> datetime:
        return datetime.fromtimestamp(self.now() if moment is None else moment, UTC)


@dataclass
class Simulation:
    """What one simulated run produced."""

    builds: int
    window: float
    webhooks: bool
    #: Simulated times of every Buildkite request from the start of the window.
    requests: list[float] = field(default_factory=list)
    requests_before_window: int = 0
    polls: int = 0
    lags: list[float] = field(default_factory=list)
    reply_lags: list[float] = field(default_factory=list)
    naive_requests: list[float] = field(default_factory=list)
    naive_lags: list[float] = field(default_factory=list)
    post_gap_min: float = float("inf")
    edit_gap_min: float = float("inf")
    posts: int = 0
    edits: int = 0
    max_posts_per_channel_second: int = 0
    max_edits_per_message_second: int = 0
    real_seconds: float = 0.0
    #: Simulated time at the start of the window.
    start: float = 0.0
    #: (start, end) in simulated time of each poll in the window.
    poll_times: list[tuple[float, float]] = field(default_factory=list)
    #: Per build: simulated seconds from its end to the start of the poll that saw it.
    waits: list[float] = field(default_factory=list)

    def per_minute(self, times: list[float], start: float, end: float) -> float:
        return sum(1 for t in times if start <= t < end) / ((end - start) / 60)


def naive(finish: list[float], start: float, rng: random.Random) -> tuple[list[float], list[float]]:
    """GET each build every 10 s (random phase) until a GET sees it finished."""
    times: list[float] = []
    lags: list[float] = []
    for end in finish:
        moment = start + rng.uniform(0, NAIVE_INTERVAL)
        while True:
            times.append(moment)
            if moment >= end:
                lags.append(moment - end)
                break
            moment += NAIVE_INTERVAL
    return times, lags


def rate_budget(
    calls: list[RecordedCall], key: str, when: Callable[[float], float] | None = None
) -> tuple[float, int]:
    """Smallest gap between two calls for one key (channel or message), and the most calls for
    one key within any 1-second window; `when` maps the calls' real times (to simulated ones)."""
    by_key: dict[str, list[float]] = {}
    for call in calls:
        name = str(call.args.get("channel")) + (
            "/" + str(call.args.get("ts")) if key == "message" else ""
        )
        by_key.setdefault(name, []).append(when(call.time) if when else call.time)
    gap, most = float("inf"), 0
    for times in by_key.values():
        times.sort()
        for a, b in itertools.pairwise(times):
            gap = min(gap, b - a)
        left = 0
        for right, moment in enumerate(times):
            while moment - times[left] >= 1.0:
                left += 1
            most = max(most, right - left + 1)
    return gap, most


async def simulate(
    redis_url: str,
    *,
    builds: int,
    window: float,
    channels: int,
    webhooks: bool,
    seed: int = 9,
) -> Simulation:
    rng = random.Random(seed)
    result = Simulation(builds=builds, window=window, webhooks=webhooks)
    started = time.monotonic()
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    clock = SimClock()
    async with FakeSlack() as slack, FakeBuildkite(token=BUILDKITE_TOKEN, rate_limit=10**9) as bk:
        bk.now = clock.datetime
        for slug in PIPELINES:
            bk.add_pipeline(slug)
        settings = Settings(
            slack_bot_token=slack.bot_token,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=slack.api_url,
            slack_hooks_url=slack.hooks_url,
            buildkite_api_token=BUILDKITE_TOKEN,
            buildkite_org=bk.org,
            buildkite_api_url=bk.url,
            buildkite_webhook_token=WEBHOOK_TOKEN,
            redis_url=redis_url,
            poll_interval=POLL_INTERVAL,
            policy_file="/nonexistent/policy.yml",
            _env_file=None,
        )
        recorded: list[float] = []
        in_flight: dict[int, float] = {}

        async def on_request(request: httpx.Request) -> None:
            recorded.append(clock.now())
            in_flight[id(request)] = time.monotonic()

        async def on_response(response: httpx.Response) -> None:
            # Each request takes BUILDKITE_LATENCY of simulated time, whatever the fake (in this
            # process, and slow at listing 1,000 builds) took for real, unless it took longer.
            took = time.monotonic() - in_flight.pop(id(response.request))
            clock.advance(max(BUILDKITE_LATENCY - took, 0.0))

        async with open_services(settings) as services:
            services.http.event_hooks["request"].append(on_request)
            services.http.event_hooks["response"].append(on_response)
            tracker = services.tracker
            tracker.clock = services.poller.clock = services.notifier.clock = clock.now
            stop = asyncio.Event()
            notifier = asyncio.create_task(services.notifier.run(stop))

            async def drain(limit: float = 300.0) -> None:
                deadline = time.monotonic() + limit
                while await client.xlen(EVENTS_STREAM) > 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the notifier did not catch up")
                    await asyncio.sleep(0.02)

            async def poll() -> None:
                await client.delete(POLL_LEASE_KEY)  # the lease would have expired by now
                began = clock.now()
                await services.poller.poll_once()
                result.polls += 1
                result.poll_times.append((began, clock.now()))

            async def deliver(slug: str, number: int) -> None:
                body = json.dumps(bk.webhook_payload(slug, number)).encode()
                headers = sign_webhook(body, WEBHOOK_TOKEN)
                verify_webhook(headers, body, WEBHOOK_TOKEN)
                event = parse_webhook(headers, body)
                assert event.build is not None
                await services.router.on_build(event.build, event.pipeline)

            # The bot started these builds: tracked while scheduled, one message each.
            fleet = []
            for index in range(builds):
                slug = PIPELINES[index % len(PIPELINES)]
                meta = {
                    SOURCE_META_KEY: SOURCE_META_VALUE,
                    REQUEST_ID_META_KEY: uuid.UUID(int=rng.getrandbits(128)).hex[:24],
                    "chatops_requested_by": USER,
                }
                live = bk.add_build(slug, meta_data=meta)
                channel = f"CPOLL{index % channels:04d}"
                await tracker.track(
                    Build.model_validate(live), pipeline=slug, channel=channel, requester=USER
                )
                fleet.append((slug, live["number"]))
            # With webhooks only Buildkite requests are counted: the Slack side is not waited for
            # until the end (it makes no Buildkite request for builds that pass).
            if not webhooks:
                await drain()
            # They all start running: seen by a poll, or each by its webhook.
            for slug, number in fleet:
                bk.set_build_state(slug, number, "running")
                if webhooks:
                    await deliver(slug, number)
            targets = {}
            if not webhooks:
                await poll()
                result.requests_before_window = len(recorded)
                result.poll_times.clear()
                await drain()
                for slug, number in fleet:
                    tracked = await services.store.find(slug, number)
                    assert tracked is not None and tracked.targets[0].ts is not None
                    targets[(slug, number)] = tracked.targets[0]

            # The window: each build finishes at a random moment of it.
            start = result.start = clock.now()
            first_call = len(slack.calls)
            finish = [start + rng.uniform(0, window) for _ in fleet]
            order = sorted(range(len(fleet)), key=lambda i: finish[i])
            done = 0
            next_poll = start + rng.uniform(0, POLL_INTERVAL)
            while True:
                while done < len(order) and finish[order[done]] <= next_poll:
                    index = order[done]
                    slug, number = fleet[index]
                    bk.now = partial(clock.datetime, finish[index])
                    bk.set_build_state(slug, number, "passed")
                    bk.now = clock.datetime
                    if webhooks:
                        clock.jump_to(finish[index])
                        await deliver(slug, number)
                    done += 1
                if done == len(order) and await services.store.pending_count() == 0:
                    break
                clock.jump_to(next_poll)
                await poll()
                # At a fixed rate, as the bot's poller does.
                next_poll = next_poll_at(next_poll, clock.now(), POLL_INTERVAL)
                if not webhooks:
                    await drain()
            await drain()
            stop.set()
            await notifier
            finish_writing = getattr(services.notifier, "finish_writing", None)
            if finish_writing is not None:  # a notifier that writes in parallel
                await finish_writing(10.0)

        result.real_seconds = time.monotonic() - started
        window_requests = recorded[result.requests_before_window :]
        result.requests = [t for t in window_requests if t >= start] if not webhooks else recorded
        result.naive_requests, result.naive_lags = naive(finish, start, random.Random(seed + 1))

        calls = slack.calls[first_call:]
        if not webhooks:
            for index, key in enumerate(fleet):
                target = targets[key]
                update = next(
                    c
                    for c in calls
                    if c.method == "chat.update" and c.args.get("ts") == target.ts and c.ok
                )
                assert "Passed" in json.dumps(update.args.get("blocks")), update.args
                result.lags.append(clock.at(update.time) - finish[index])
                seen = min(b for b, _ in result.poll_times if b >= finish[index])
                result.waits.append(seen - finish[index])
                reply = next(
                    c
                    for c in calls
                    if c.method == "chat.postMessage" and c.args.get("thread_ts") == target.ts
                )
                result.reply_lags.append(clock.at(reply.time) - finish[index])
        posts = [c for c in slack.calls if c.method == "chat.postMessage" and c.ok]
        edits = [c for c in slack.calls if c.method == "chat.update" and c.ok]
        result.posts, result.edits = len(posts), len(edits)
        # In simulated time: what Slack would see had the time between polls not been skipped.
        budget = rate_budget(posts, "channel", clock.at)
        result.post_gap_min, result.max_posts_per_channel_second = budget
        budget = rate_budget(edits, "message", clock.at)
        result.edit_gap_min, result.max_edits_per_message_second = budget
        if problems := unexpected(slack, bk):
            raise RuntimeError(f"unexpected requests: {problems[:3]}")
    await client.aclose()
    return result
