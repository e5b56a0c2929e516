"""`python -m app ledger rebuild`: the ledger recorded again from Buildkite's builds, what it
costs in requests (counted by the fake), the ledger's bounds, that rebuilding twice changes
nothing, and that the deployments it found running reach their end in the ledger."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.core.ledger_followup import LedgerFollowUp
from app.core.releases import LedgerRecorder
from app.ledger_cli import rebuild, summary
from app.simulators.bot import FAST, bot_settings, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from tests.clocks import Clock
from tests.test_ops_check_config import child_env
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
ORG_BUILDS = "/organizations/acme/builds"
POLICY = """\
notifications:
  - pipelines: ["ext-*"]
    branches: ["main"]
    channel: C0CHAN
    deploy: true
  - pipelines: ["ci"]
    channel: C0CHAN
"""


def bot_meta(user: str = "U0USER", **extra: str) -> dict[str, str]:
    return {"chatops_source": "slack", "chatops_requested_by": user, **extra}


def seed(bk: FakeBuildkite) -> None:
    """250 deployments the bot started across three pipelines, and builds that are not."""
    for slug in ("web", "api", "deploy-prod", "ext-deploy", "ci"):
        bk.add_pipeline(slug, repository=f"https://github.com/acme/{slug}")
    for index in range(120):
        bk.add_build("web", commit=f"{index:040x}", state="passed", meta_data=bot_meta())
    for index in range(80):
        state = "failed" if index % 4 == 0 else "passed"
        bk.add_build("api", commit=f"{index:040x}", state=state, meta_data=bot_meta("U0BOB"))
    for index in range(49):
        bk.add_build("deploy-prod", commit=f"{index:040x}", state="passed", meta_data=bot_meta())
    bk.add_build(
        "deploy-prod",
        commit="f" * 40,
        state="running",
        meta_data=bot_meta(chatops_approved_by="U0BOB", chatops_rollback_of="49"),
    )
    # Older than the ledger keeps: not listed (created_from), not recorded.
    bk.add_build(
        "web",
        state="passed",
        meta_data=bot_meta(),
        created_at=datetime.now(UTC) - timedelta(days=91),
    )
    # Not the bot's, not a deploy route's: not deployments.
    for _ in range(20):
        bk.add_build("ci", state="passed")
    bk.add_build("web", state="passed")
    # A deploy route's builds: on its branch only.
    for _ in range(5):
        bk.add_build("ext-deploy", commit="e" * 40, branch="main", state="passed")
    bk.add_build("ext-deploy", branch="feature", state="passed")


@pytest.fixture
def policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.yml"
    path.write_text(POLICY)
    return str(path)


async def test_rebuild_reads_100_deployments_a_request(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, policy: str
) -> None:
    seed(bk)
    settings = bot_settings(slack, bk, redis_url, policy_file=policy)
    report, sent = await rebuild(settings)

    org_lists = bk.requests_to("GET", ORG_BUILDS)
    assert len(org_lists) == math.ceil(250 / 100)
    first = org_lists[0]
    assert first.param("meta_data[chatops_source]") == "slack"
    assert first.param("per_page") == "100" and first.param("exclude_jobs") == "true"
    assert first.param("created_from") is not None
    # The glob route costs one list of pipelines, then one list of its pipeline's builds.
    lists = bk.requests_to("GET", "/organizations/acme/pipelines")
    assert len([r for r in lists if r.api_path == "/organizations/acme/pipelines"]) == 1
    (routed,) = bk.requests_to("GET", "/organizations/acme/pipelines/ext-deploy/builds")
    assert routed.params("branch[]") == ["main"] and routed.params("state[]") == ["finished"]
    assert sent == len(bk.requests) == 3 + 1 + 1
    assert report.builds_read == 250 + 5 and report.recorded == 255
    assert report.pipelines == {"web", "api", "deploy-prod", "ext-deploy"}

    assert await redis_client.zcard(keys.LEDGER_KEY.format(pipeline="web")) == 120
    assert await redis_client.zcard(keys.LEDGER_KEY.format(pipeline="api")) == 80
    assert await redis_client.zcard(keys.LEDGER_KEY.format(pipeline="ext-deploy")) == 5
    assert await redis_client.exists(keys.LEDGER_KEY.format(pipeline="ci")) == 0
    running = json.loads(
        await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline="deploy-prod", number=50))
    )
    assert running["o"] == "running" and running["a"] == "U0BOB" and running["rb"] == 49
    failed = json.loads(
        await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline="api", number=1))
    )
    assert failed["o"] == "failed" and failed["r"] == "U0BOB" and failed["c"] == "0" * 40
    routed_entry = json.loads(
        await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline="ext-deploy", number=1))
    )
    assert routed_entry["s"] == "route"
    info = json.loads(await redis_client.hget(keys.LEDGER_INFO_KEY, "web"))
    assert info == {"repository": "https://github.com/acme/web", "default_branch": "main"}

    # Again: the same requests, nothing written.
    before = {
        key: await redis_client.get(key)
        async for key in redis_client.scan_iter(
            match=keys.DEPLOYMENT_KEY.format(pipeline="*", number="*")
        )
    }
    again, _ = await rebuild(settings)
    assert again.recorded == 0 and again.builds_read == 255
    for key, value in before.items():
        assert await redis_client.get(key) == value


async def test_the_ledger_keeps_the_last_200_of_a_pipeline(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("web")
    for index in range(230):
        bk.add_build("web", commit=f"{index:040x}", state="passed", meta_data=bot_meta())
    _, sent = await rebuild(bot_settings(slack, bk, redis_url))
    assert sent == 3
    numbers = await redis_client.zrange(keys.LEDGER_KEY.format(pipeline="web"), 0, -1)
    assert [int(n) for n in numbers] == list(range(31, 231))
    for gone in (1, 30):
        key = keys.DEPLOYMENT_KEY.format(pipeline="web", number=gone)
        assert await redis_client.exists(key) == 0
    assert await redis_client.exists(keys.DEPLOYMENT_KEY.format(pipeline="web", number=31)) == 1


async def test_the_command_line_says_what_it_cost(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> None:
    bk.add_pipeline("web")
    for index in range(3):
        bk.add_build("web", commit=f"{index:040x}", state="passed", meta_data=bot_meta())
    common = {
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_SIGNING_SECRET": "sign-secret-value",
        "BUILDKITE_API_TOKEN": bk.token,
        "BUILDKITE_API_URL": bk.url,
        "BUILDKITE_ORG": bk.org,
    }
    for env, code in ((child_env(**common, REDIS_URL=redis_url), 0), (child_env(**common), 2)):
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "ledger",
            "rebuild",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(child.communicate(), 60)
        assert child.returncode == code, (out, err)
        if code == 0:
            assert out.decode().strip() == (
                "Read 3 builds in 1 Buildkite requests; recorded 3 deployments of 1 pipelines "
                "(the others were in the ledger already)."
            )
        else:
            assert "REDIS_URL is not set" in err.decode()
        assert bk.token not in (out + err).decode()
    assert await redis_client.zcard(keys.LEDGER_KEY.format(pipeline="web")) == 3


async def test_a_buildkite_rebuild_is_recorded_without_its_originals_marks(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    # The live ledger records a Buildkite rebuild without who approved the original, nor its
    # rollback or promotion mark (they were copied, not given): the rebuild from Buildkite too.
    bk.add_pipeline("web")
    marks = bot_meta(
        chatops_approved_by="U0BOB", chatops_rollback_of="5", chatops_promoted_from="stg#2"
    )
    original = bk.add_build("web", commit="1" * 40, state="passed", meta_data=marks)
    rebuilt = bk.add_build("web", commit="1" * 40, state="passed", meta_data=marks)
    rebuilt["rebuilt_from"] = {"id": original["id"], "number": 1, "url": original["url"]}
    await rebuild(bot_settings(slack, bk, redis_url))
    first, second = [
        json.loads(await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline="web", number=n)))
        for n in (1, 2)
    ]
    assert (first["r"], first["a"], first["rb"], first["pf"]) == ("U0USER", "U0BOB", 5, "stg#2")
    assert not {"r", "a", "rb", "pf"} & set(second) and second["o"] == "passed"


async def test_a_429_is_waited_out_and_counted_and_a_long_one_stops_with_what_was_read(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, policy: str
) -> None:
    seed(bk)
    settings = bot_settings(slack, bk, redis_url, policy_file=policy)
    # Two short 429s on the list of the bot's builds: waited out, then read on.
    bk.rate_limit_next(1, reset=1, path_contains=ORG_BUILDS)
    bk.rate_limit_next(1, reset=1, path_contains=ORG_BUILDS)
    report, sent = await rebuild(settings)
    assert report.stopped is None and report.recorded == 255
    assert sent == len(bk.requests) == 3 + 1 + 1 + 2  # each 429 is a request it cost
    assert summary(report, sent).startswith("Read 255 builds in 7 Buildkite requests;")

    # Redis lost again, and Buildkite says to wait an hour for the deploy route's builds.
    await redis_client.flushall()
    bk.clear_requests()
    bk.rate_limit_next(1, reset=3600, path_contains="/pipelines/ext-deploy/builds")
    report, sent = await rebuild(settings)
    assert report.recorded == 250 and "429" in (report.stopped or "")
    assert bk.token not in (report.stopped or "")
    assert await redis_client.zcard(keys.LEDGER_KEY.format(pipeline="web")) == 120
    # Run again once it may: the rest is recorded, the rest left as it was.
    report, _ = await rebuild(settings)
    assert report.stopped is None and report.recorded == 5


def build_gets(bk: FakeBuildkite, slug: str, number: int) -> int:
    path = f"/organizations/acme/pipelines/{slug}/builds/{number}"
    return len([r for r in bk.requests_to("GET", path) if r.api_path == path])


async def entry(redis_client: Any, slug: str, number: int) -> dict[str, Any]:
    raw = await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline=slug, number=number))
    return dict(json.loads(raw))


async def test_a_rebuilt_running_deployment_is_followed_to_its_end_once_across_replicas(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod")
    bk.add_build("deploy-prod", state="passed", meta_data=bot_meta())
    bk.add_build("deploy-prod", commit="f" * 40, state="running", meta_data=bot_meta())
    report, sent = await rebuild(bot_settings(slack, bk, redis_url))
    assert report.recorded == 2 and report.followed_up == 1
    assert summary(report, sent).endswith(
        " 1 still running: the bot asks Buildkite how they end and records it."
    )
    assert (await entry(redis_client, "deploy-prod", 2))["o"] == "running"

    clock = Clock(time.time())
    quiet = dataclasses.replace(FAST, clock=clock)  # on the test's clock: its sweeps decide
    async with (
        running_bot(slack, bk, redis_url, tuning=quiet) as one,
        running_bot(slack, bk, redis_url, tuning=quiet) as two,
    ):
        followups = [
            LedgerFollowUp(
                bot.services.store,
                bot.services.buildkite,
                LedgerRecorder(bot.services.policy, bot.services.store, bot.services.buildkite),
                clock,
            )
            for bot in (one, two)
        ]

        async def sweep_both() -> list[int]:
            return sorted(await asyncio.gather(*(f.sweep() for f in followups)))

        # Still running: one replica asks, once (perhaps a bot's own first sweep, at its start:
        # waited for); neither asks again within the minute.
        assert await sweep_both() == [0, 0]
        await wait_until(
            lambda: build_gets(bk, "deploy-prod", 2) >= 1, timeout=30, what="asked about #2"
        )
        for bot in (one, two):
            await bot.settled()
        assert build_gets(bk, "deploy-prod", 2) == 1
        clock.now += 30
        assert await sweep_both() == [0, 0]
        assert build_gets(bk, "deploy-prod", 2) == 1

        bk.set_build_state("deploy-prod", 2, "passed")
        clock.now += 31
        assert await sweep_both() == [0, 1]
        assert build_gets(bk, "deploy-prod", 2) == 2
        ended = await entry(redis_client, "deploy-prod", 2)
        assert ended["o"] == "passed" and ended["f"] and ended["r"] == "U0USER"
        assert await redis_client.exists(keys.LEDGER_FOLLOWUP_KEY) == 0
        clock.now += 3600
        assert await sweep_both() == [0, 0]
        assert build_gets(bk, "deploy-prod", 2) == 2


async def test_the_follow_up_waits_out_a_rate_limit_and_gives_up_on_what_it_cannot_read(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod")
    for _ in range(5):
        bk.add_build("deploy-prod", state="running", meta_data=bot_meta())
    report, _ = await rebuild(bot_settings(slack, bk, redis_url))
    assert report.followed_up == 5
    start = time.time()
    clock = Clock(start)
    # The bot's own sweep lives a day earlier: nothing is due for it, the test's sweeps decide.
    tuning = dataclasses.replace(FAST, clock=Clock(start - 86400))
    async with running_bot(slack, bk, redis_url, tuning=tuning) as bot:
        s = bot.services
        recorder = LedgerRecorder(s.policy, s.store, s.buildkite)
        followup = LedgerFollowUp(s.store, s.buildkite, recorder, clock, interval=60)

        def gets() -> list[int]:
            return [build_gets(bk, "deploy-prod", number) for number in range(1, 6)]

        async def sweep_for(minutes: int) -> None:
            for _ in range(minutes):
                await followup.sweep()
                clock.now += 60

        # A 429 for the next hour: one request, then none until its reset, minute after minute.
        bk.rate_limit_next(1, reset=3600, path_contains="/pipelines/deploy-prod/builds/")
        await sweep_for(10)
        assert gets() == [1, 0, 0, 0, 0]
        clock.now = start + 3601
        await followup.sweep()
        assert gets() == [2, 1, 1, 1, 1]  # past the reset: each asked once, still running

        # The token may not read two of them: each is asked once more, then given up on.
        bk.fail_next(2, status=403, path_contains="/pipelines/deploy-prod/builds/")
        clock.now += 3600
        await sweep_for(60)
        assert gets()[:2] == [3, 2]
        asked = gets()
        await sweep_for(60)
        assert gets()[:2] == [3, 2] and gets()[2:] > asked[2:]
        members = await redis_client.zrange(keys.LEDGER_FOLLOWUP_KEY, 0, -1)
        assert sorted(members) == [b"deploy-prod#3", b"deploy-prod#4", b"deploy-prod#5"]

        # Two days after it started, a build still running (left blocked, say) is let go.
        asked = gets()
        clock.now = start + 2 * 86400 + 60
        await sweep_for(10)
        assert gets() == asked
        assert await redis_client.exists(keys.LEDGER_FOLLOWUP_KEY) == 0
        assert (await entry(redis_client, "deploy-prod", 5))["o"] == "running"


async def test_a_slow_follow_up_is_not_taken_over_by_the_next_sweep(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str
) -> None:
    bk.add_pipeline("deploy-prod")
    bk.add_build("deploy-prod", state="running", meta_data=bot_meta())
    await rebuild(bot_settings(slack, bk, redis_url))
    start = time.time()
    clock = Clock(start)
    # The bot's own sweep lives a day earlier: nothing is due for it, the test's sweeps decide.
    tuning = dataclasses.replace(FAST, clock=Clock(start - 86400))
    async with running_bot(slack, bk, redis_url, tuning=tuning) as bot:
        s = bot.services
        replicas = [
            LedgerFollowUp(
                s.store, s.buildkite, LedgerRecorder(s.policy, s.store, s.buildkite), clock
            )
            for _ in range(2)
        ]
        bk.delay_next(1, 2.0, "/pipelines/deploy-prod/builds/1", method="GET")
        slow = asyncio.create_task(replicas[0].sweep())
        await wait_until(
            lambda: build_gets(bk, "deploy-prod", 1) == 1, timeout=30, what="asked about #1"
        )
        clock.now += 2 * 60 + 1  # two intervals on, Buildkite still answering the first
        assert await replicas[1].sweep() == 0
        assert await slow == 0
        assert build_gets(bk, "deploy-prod", 1) == 1


async def test_the_bot_records_the_end_of_a_rebuilt_running_deployment_on_its_own(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod")
    bk.add_build("deploy-prod", state="running", meta_data=bot_meta())
    await rebuild(bot_settings(slack, bk, redis_url))
    eager = dataclasses.replace(FAST, sweeps=dataclasses.replace(FAST.sweeps, ledger_interval=0.05))
    async with running_bot(slack, bk, redis_url, tuning=eager):
        await wait_until(
            lambda: build_gets(bk, "deploy-prod", 1) > 0, timeout=30, what="asked about #1"
        )
        bk.set_build_state("deploy-prod", 1, "failed")

        async def failed() -> bool:
            return bool((await entry(redis_client, "deploy-prod", 1))["o"] == "failed")

        await wait_until(failed, timeout=30, what="#1 recorded as failed")
