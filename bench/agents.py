"""Item 6: agents on /mcp (app.agents), through the SDK's own client with a bearer token.

- `get_build` latency, one agent calling in turn, against a bare MCP server of the same SDK and
  transport (`bench.serve bare_mcp`) whose tool returns a constant; bot and bare alternate in
  rounds, so that a change of the machine's load falls on both.
- `wait_for_build` wake-up: from sending the signed `build.finished` webhook to the tool call's
  return, one build at a time (the wait is under way before the webhook is sent).
- Buildkite requests spent by an agent waiting on 100 running builds: the requests reaching the
  fake during windows of the agent's waits, against windows of the tracker alone (before and
  after), each window a whole number of poll intervals starting between two polls.

The bot runs in a child process (as `python -m app` would, redis-server behind it); the Slack and
Buildkite fakes and the agent's client run in this process, so a webhook's send time and the
tool call's return are read on one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as redis

from app.simulators import agent_client
from app.simulators.buildkite import FakeBuildkite, sign_webhook
from app.simulators.slack import FakeSlack
from app.storage.agents import build_topic
from app.storage.keys import EVENTS_STREAM
from app.storage.store import Store
from bench.common import BUILDKITE_TOKEN, USER, WEBHOOK_TOKEN, Child, median, percentile, unexpected
from bench.webhooks import wait_for, windowed

#: The agent's bearer token (the fakes' own, obviously fake).
AGENT_TOKEN = "mcp-bench-agent-token"  # noqa: S105
#: Builds the agent waits on in the requests figure (the issue's 100).
WAITED_BUILDS = 100
PIPELINES = [f"svc-{n}" for n in range(WAITED_BUILDS)]
#: The tracker's poll interval in these runs (seconds): short, so a window holds many polls.
POLL_INTERVAL = 5.0
#: How long a wait is under way before its build's webhook is sent.
WAIT_HEADSTART = 0.1
#: A build read of one build (not a listing): what a wait asking Buildkite would send.
BUILD_READ = re.compile(r"/pipelines/[^/]+/builds/\d+")
#: The tracker's polls: the organisation's build list (finished, then active), nothing else.
TRACKER_POLL = re.compile(r"^/v2/organizations/[^/]+/builds$")


def policy() -> str:
    """One agent, acting for USER, with budgets no run reaches; a channel per pipeline, so that
    the bot's Slack pacing (one post a second in a channel) does not queue its messages."""
    grant = f'[{USER}, "agent:bench"]'
    rules = "".join(
        f"  {slug}:\n    channels: [C{n:04d}]\n    deployers: {grant}\n"
        for n, slug in enumerate(PIPELINES)
    )
    return (
        "admins: [U0ADMIN]\n"
        "agents:\n"
        "  bench:\n"
        f'    token_sha256: "{agent_client.token_sha256(AGENT_TOKEN)}"\n'
        f"    acts_for: {USER}\n"
        "    budget: {mutations_per_hour: 10000, reads_per_minute: 10000}\n"
        f"default:\n  deployers: {grant}\n"
        "pipelines:\n" + rules
    )


class Agent:
    """The agent's side: the SDK's ClientSession over Streamable HTTP, with its bearer token."""

    def __init__(self, base: str) -> None:
        self.base = base

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        async with agent_client.agent_session(self.base, AGENT_TOKEN) as session:
            yield session


async def timed_calls(session: Any, count: int, *, check: bool) -> list[float]:
    """`count` get_build calls in turn; each one's latency in ms."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        result = await agent_client.call(session, "get_build", pipeline="svc-0", number=1)
        latencies.append((time.perf_counter() - started) * 1000)
        if result.is_error or (check and not isinstance(result.structured_content, dict)):
            raise RuntimeError(f"get_build failed: {agent_client.text_of(result)[:200]}")
    return latencies


async def get_build_latencies(bot: Agent, bare: Agent, calls: int, rounds: int) -> dict[str, Any]:
    """Bot and bare in alternate rounds of calls/rounds each, after a warm-up of each."""
    out: dict[str, list[float]] = {"bot": [], "bare": []}
    async with bot.session() as ours, bare.session() as theirs:
        await timed_calls(ours, 50, check=True)
        await timed_calls(theirs, 50, check=True)
        for _ in range(rounds):
            out["bot"] += await timed_calls(ours, calls // rounds, check=True)
            out["bare"] += await timed_calls(theirs, calls // rounds, check=True)
    return {name: {**windowed(values), "calls": len(values)} for name, values in out.items()}


class Builds:
    """Deploys through the agent, and the signed webhooks that move its builds."""

    def __init__(
        self, http: aiohttp.ClientSession, base: str, bk: FakeBuildkite, store: redis.Redis
    ) -> None:
        self.http = http
        self.base = base
        self.bk = bk
        self.redis = store
        self.deployed: set[tuple[str, int]] = set()

    async def deploy(self, session: Any, slug: str) -> int:
        """A new build of `slug`: each deploy has its own idempotency key (the bot answers a
        repeated identical call without one with the first call's build, as a retry)."""
        done = await agent_client.structured(
            session, "deploy", pipeline=slug, idempotency_key=f"bench-{uuid.uuid4()}"
        )
        if done["status"] != "started" or not done.get("build"):
            raise RuntimeError(f"deploy of {slug}: {done}")
        number = int(done["build"]["number"])
        if (slug, number) in self.deployed:
            raise RuntimeError(f"deploy of {slug} answered an earlier build, #{number}")
        self.deployed.add((slug, number))
        return number

    async def webhook(self, slug: str, number: int, state: str) -> float:
        """Move the build to `state` in the fake and send its signed webhook; when it was sent."""
        self.bk.set_build_state(slug, number, state)
        payload = self.bk.webhook_payload(slug, number)
        body = json.dumps(payload).encode()
        headers = sign_webhook(body, WEBHOOK_TOKEN, event=payload["event"])
        headers["Content-Type"] = "application/json"
        sent = time.perf_counter()
        async with self.http.post(
            f"{self.base}/buildkite/webhook", data=body, headers=headers
        ) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"the webhook was answered {response.status}")
        return sent

    async def drained(self) -> None:
        async def empty() -> bool:
            return int(await self.redis.xlen(EVENTS_STREAM)) == 0

        await wait_for(empty, "the bot's events", timeout=120)


async def running_builds(builds: Builds, session: Any, count: int) -> list[tuple[str, int]]:
    """`count` builds deployed by the agent, one per pipeline, then running (by webhook)."""
    started = [(slug, await builds.deploy(session, slug)) for slug in PIPELINES[:count]]
    for slug, number in started:
        await builds.webhook(slug, number, "running")
    await builds.drained()
    return started


class Announcements:
    """When each change announcement the bot publishes (`Store.announce`) reaches this process:
    it splits a wake-up into the bot's event pipeline and the wait's own wake and answer."""

    def __init__(self, client: redis.Redis) -> None:
        self.store = Store(client)
        self.heard: dict[str, float] = {}
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Announcements:
        self.pubsub = await self.store.subscribe_changes()
        self.task = asyncio.create_task(self._listen())
        return self

    async def _listen(self) -> None:
        async for message in self.pubsub.listen():
            if message.get("type") == "message":
                self.heard.setdefault(message["data"].decode(), time.perf_counter())

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]


async def wake_latencies(
    builds: Builds, agent: Agent, targets: list[tuple[str, int]], extra: int
) -> dict[str, list[float]]:
    """For each build in turn: a wait for it to finish, then its `build.finished` webhook; ms
    from the webhook's sending to the wait's return (and to the webhook's answer, and to the
    bot's announcement of the change). `extra` more builds are deployed for it."""
    out: dict[str, list[float]] = {"return": [], "acked": [], "announced": []}
    async with agent.session() as session, Announcements(builds.redis) as heard:
        for index in range(extra):
            slug = PIPELINES[index % len(PIPELINES)]
            number = await builds.deploy(session, slug)
            await builds.webhook(slug, number, "running")
            targets.append((slug, number))
        await builds.drained()
        for slug, number in targets:
            topic = build_topic(builds.bk.build(slug, number)["id"])
            waiting = asyncio.create_task(
                agent_client.structured(
                    session, "wait_for_build", pipeline=slug, number=number, timeout_seconds=30
                )
            )
            await asyncio.sleep(WAIT_HEADSTART)
            if waiting.done():
                raise RuntimeError(
                    f"the wait on {slug} #{number} returned before its webhook: {waiting.result()}"
                )
            heard.heard.pop(topic, None)
            sent = await builds.webhook(slug, number, "passed")
            out["acked"].append((time.perf_counter() - sent) * 1000)
            done = await asyncio.wait_for(waiting, 40)
            out["return"].append((time.perf_counter() - sent) * 1000)
            if topic in heard.heard:
                out["announced"].append((heard.heard[topic] - sent) * 1000)
            if not done["reached"] or (done["build"] or {}).get("state") != "passed":
                raise RuntimeError(f"the wait on {slug} #{number} returned {done}")
    return out


async def between_polls(bk: FakeBuildkite) -> None:
    """Return half a poll interval after a poll's first request: windows start between polls."""
    seen = len(bk.requests)

    async def polled() -> bool:
        return len(bk.requests) > seen

    await wait_for(polled, "a poll", timeout=4 * POLL_INTERVAL)
    await asyncio.sleep(POLL_INTERVAL / 2)


async def tracker_alone(bk: FakeBuildkite, window: float) -> list[Any]:
    await between_polls(bk)
    first = len(bk.requests)
    await asyncio.sleep(window)
    return list(bk.requests[first:])


async def while_waiting(
    bk: FakeBuildkite, agent: Agent, targets: list[tuple[str, int]], window: float
) -> tuple[list[Any], int]:
    """Requests reaching Buildkite while the agent waits on every target at once (each wait
    asked again when it times out), and how many waits were answered."""
    answered = 0
    sessions = 4

    async def keep_waiting(session: Any, slug: str, number: int, until: float) -> None:
        nonlocal answered
        while (left := until - time.monotonic()) > 1:
            done = await agent_client.structured(
                session,
                "wait_for_build",
                pipeline=slug,
                number=number,
                timeout_seconds=int(min(50, left)),
            )
            if done["reached"]:
                raise RuntimeError(f"{slug} #{number} finished while waited on: {done}")
            answered += 1

    async with contextlib.AsyncExitStack() as stack:
        opened = [await stack.enter_async_context(agent.session()) for _ in range(sessions)]
        await between_polls(bk)
        first = len(bk.requests)
        until = time.monotonic() + window
        await asyncio.gather(
            *(
                keep_waiting(opened[index % sessions], slug, number, until)
                for index, (slug, number) in enumerate(targets)
            )
        )
        await asyncio.sleep(until - time.monotonic())
        seen = list(bk.requests[first:])
    return seen, answered


async def run(
    redis_url: str, *, calls: int, rounds: int, window: float, wakes: int
) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    await client.flushdb()
    out: dict[str, Any] = {"window": window, "poll_interval": POLL_INTERVAL}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="bench-policy-") as file:
        file.write(policy())
        file.flush()
        async with (
            FakeSlack() as slack,
            FakeBuildkite(token=BUILDKITE_TOKEN, rate_limit=10**9) as bk,
            aiohttp.ClientSession() as http,
        ):
            for slug in PIPELINES:
                bk.add_pipeline(slug)
            bk.add_build("svc-0", state="passed")
            config = {
                "slack_api_url": slack.api_url,
                "slack_hooks_url": slack.hooks_url,
                "bk_url": bk.url,
                "redis_url": redis_url,
                "policy_file": str(Path(file.name)),
                "poll_interval": POLL_INTERVAL,
            }
            bot, bare = Child("bot", config), Child("bare_mcp", {})
            try:
                await bare.start()
                await bot.start()
                ours = Agent(f"http://127.0.0.1:{bot.info['port']}")
                theirs = Agent(f"http://127.0.0.1:{bare.info['port']}")
                out["get_build"] = await get_build_latencies(ours, theirs, calls, rounds)
                await bare.stop()

                builds = Builds(http, ours.base, bk, client)
                async with ours.session() as session:
                    targets = await running_builds(builds, session, WAITED_BUILDS)
                await asyncio.sleep(2.0)
                before = await tracker_alone(bk, window)
                waiting, answered = await while_waiting(bk, ours, targets, window)
                after = await tracker_alone(bk, window)
                out["requests"] = {
                    "before": len(before),
                    "waiting": len(waiting),
                    "after": len(after),
                    "waiting_build_reads": sum(1 for r in waiting if BUILD_READ.search(r.path)),
                    "waiting_not_polls": sum(1 for r in waiting if not TRACKER_POLL.match(r.path)),
                    "not_polls_alone": sum(
                        1 for r in [*before, *after] if not TRACKER_POLL.match(r.path)
                    ),
                    "waiting_paths": sorted({r.path for r in waiting}),
                    "waits_answered": answered,
                }
                extra = max(wakes - len(targets), 0)
                out["wake"] = await wake_latencies(builds, ours, targets, extra)
                out["bot_error_log_lines"] = bot.error_lines()
            except BaseException:
                print(f"bot log, last lines:\n{bot.tail()}", file=sys.stderr)
                raise
            finally:
                await bot.stop()
                await bare.stop()
                for process in (bot, bare):
                    process.log.unlink(missing_ok=True)
            if problems := unexpected(slack, bk):
                raise RuntimeError(f"unexpected requests: {problems[:3]}")
    await client.aclose()
    wake = out["wake"]["return"]
    out["wake_summary"] = {
        **windowed(wake),
        "all_p50_ms": median(wake),
        "all_p99_ms": percentile(wake, 99),
        "acked_p50_ms": median(out["wake"]["acked"]),
        "acked_p99_ms": percentile(out["wake"]["acked"], 99),
        "announced_p50_ms": median(out["wake"]["announced"]),
        "announced_p99_ms": percentile(out["wake"]["announced"], 99),
        "announced": len(out["wake"]["announced"]),
    }
    return out
