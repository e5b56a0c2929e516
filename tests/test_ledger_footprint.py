"""What one deployment costs in the ledger, measured with MEMORY USAGE in a real Redis (the
figure in docs/releases.md), and that `/deploy status all` over 50 pipelines asks Buildkite
nothing and fits in one Slack message."""

from __future__ import annotations

import time
from typing import Any

from app.simulators.bot import BotClient
from app.simulators.buildkite import FakeBuildkite
from app.storage import keys
from app.storage.ledger import Deployment, Outcome, PipelineInfo
from app.storage.store import Store

#: The bytes a deployment costs: its entry, and its share of the pipeline's sorted set.
BYTES_PER_DEPLOYMENT = 400


def realistic(pipeline: str, number: int, now: float) -> Deployment:
    """A deployment with the lengths a real one has: a 40-character SHA, a release branch,
    two people, a rollback mark."""
    return Deployment(
        pipeline=pipeline,
        number=4000 + number,
        web_url=f"https://buildkite.com/acme-inc/{pipeline}/builds/{4000 + number}",
        commit=f"{number:040x}",
        branch="release/2026-12-03",
        outcome=Outcome.PASSED,
        requested_by="U01ABCDEF23",
        approved_by="U04GHIJKL56",
        started_at=int(now) - 600,
        finished_at=int(now) - 300,
        rollback_of=4000 + number - 1 if number % 10 == 0 else None,
    )


async def test_a_deployment_costs_at_most_400_bytes(redis_client: Any) -> None:
    store = Store(redis_client)
    now = time.time()
    for number in range(200):
        await store.record_deployment(realistic("payments-api", number, now), now=now)
    entries = [
        await redis_client.memory_usage(key)
        async for key in redis_client.scan_iter(
            match=keys.DEPLOYMENT_KEY.format(pipeline="payments-api", number="*")
        )
    ]
    assert len(entries) == 200
    # SAMPLES 0: every member counted (the default samples 5 and estimates the rest).
    index = await redis_client.memory_usage(
        keys.LEDGER_KEY.format(pipeline="payments-api"), samples=0
    )
    per_deployment = (sum(entries) + index) / 200
    print(f"ledger bytes per deployment: {per_deployment:.0f} (entry {sum(entries) / 200:.0f})")
    assert per_deployment <= BYTES_PER_DEPLOYMENT
    # Each entry expires 90 days after its deployment started.
    ttl = await redis_client.ttl(keys.DEPLOYMENT_KEY.format(pipeline="payments-api", number=4000))
    assert keys.LEDGER_KEEP - 1200 < ttl <= keys.LEDGER_KEEP


async def test_status_of_50_pipelines_reads_redis_only(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    store = bot.services.store
    now = time.time()
    pipelines = [f"service-{index:02d}-deploy" for index in range(50)]
    info = PipelineInfo(repository="git@github.com:acme/monorepo.git", default_branch="main")
    for pipeline in pipelines:
        for number in range(3):
            await store.record_deployment(realistic(pipeline, number, now), info=info, now=now)
    before = len(bk.requests)
    calls = await _command_calls(redis_client)
    _, name, _ = await bot.command("/deploy", "status all")
    (reply,) = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    assert len(bk.requests) == before  # zero Buildkite requests, whatever the count
    # The ledger's reads, as docs/releases.md counts them: one pipelined batch of 50 ZREVRANGE,
    # one MGET of their entries, one HMGET of their info (the bot's loops use none of these).
    after = await _command_calls(redis_client)
    spent = {c: after.get(c, 0) - calls.get(c, 0) for c in ("zrevrange", "mget", "hmget")}
    assert spent == {"zrevrange": 50, "mget": 1, "hmget": 1}
    blocks = reply.json["blocks"]
    assert len(blocks) <= 50
    assert all(len(block["text"]["text"]) <= 3000 for block in blocks)
    text = "\n".join(block["text"]["text"] for block in blocks)
    assert all(f"`{pipeline}`" in text for pipeline in pipelines)
    assert text.count("https://github.com/acme/monorepo/compare/") == 50
    print(f"status all, 50 pipelines: {len(blocks)} sections, {len(text)} characters")


async def _command_calls(redis_client: Any) -> dict[str, int]:
    """How many times the server ran each command so far (INFO commandstats)."""
    stats = await redis_client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
