"""Real Buildkite shapes end to end: odd builds and agents, outcomes, clusters, webhooks.

Buildkite's docs, other clients' recordings and go-buildkite show shapes that the tidy picture
leaves out (an author that is a bare email, states added later, "2021-06-01 08:23:35 UTC"
times, clustered agents without a queue tag, broken jobs, clustered organisations). Each test
drives the real bot over signed HTTP, with the fakes serving those shapes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

CHANNEL = "C0CHAN"
ADMIN = "U0ADMIN"
ORG = "/organizations/acme"
STEPS = "steps:\n  - label: Test\n    command: make test\n"
POLICY = "admins: [U0ADMIN]\n"


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.fixture
def policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.yml"
    path.write_text(POLICY)
    return str(path)


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, policy: str
) -> AsyncIterator[BotClient]:
    slack.add_user(ADMIN, "admin", "admin@example.com")
    async with running_bot(
        slack,
        bk,
        redis_url,
        policy_file=policy,
        pipeline_templates={"default": STEPS},
    ) as client:
        bk.clear_requests()
        yield client


async def answer(bot: BotClient, text: str, **kwargs: Any) -> str:
    """/buildkite <text>; the first answer posted to its response_url, as text and blocks."""
    _, name, _ = await bot.command("/buildkite", text, **kwargs)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    reply = posts[0].json
    return json.dumps(reply.get("blocks", [])) + str(reply.get("text", ""))


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- one odd item never breaks the page ----------------------------------------------------------


async def test_the_builds_list_shows_every_readable_shape_and_skips_one_it_cannot_read(
    bot: BotClient, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture
) -> None:
    bk.add_pipeline("web")
    emailed = bk.add_build("web", state="passed", author="dev@example.com", message="By email")
    emailed["started_at"], emailed["finished_at"] = (
        "2021-06-01 08:23:35 UTC",
        "2021-06-01 08:24:50 UTC",
    )
    odd = bk.add_build("web", state="passed", message="Unreadable")
    odd["web_url"] = {"not": "a url"}
    waiting = bk.add_build("web", message="Waiting")
    waiting["state"] = "waiting_failed"  # in the docs' data model, unknown to this code
    with caplog.at_level(logging.WARNING):
        text = await answer(bot, "builds web")
    assert "By email" in text and "1m 15s" in text  # the old time format is read
    assert ":grey_question: `waiting_failed` <https://buildkite.com/acme/web/builds/3|web #3>" in (
        text
    )
    assert "Unreadable" not in text
    skipped = [w for w in warnings(caplog) if odd["id"] in w]
    assert len(skipped) == 1 and "web_url" in skipped[0], warnings(caplog)


async def test_agents_in_a_cluster_are_found_by_their_queue(
    bot: BotClient, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture
) -> None:
    bk.add_agent("tagged-1", queue="deploy")
    bk.add_agent("clustered-1", queue="deploy", cluster="78088c9a-6e72-4896-848d-e6f479f50c24")
    old = bk.add_agent("old-1", queue="deploy")
    old["created_at"] = "2015-05-09 21:05:59 UTC"  # agents recorded in 2015 look like this
    odd = bk.add_agent("odd-1", queue="deploy")
    odd["name"] = None
    bk.add_agent("other-1", queue="default", cluster="78088c9a-6e72-4896-848d-e6f479f50c24")
    with caplog.at_level(logging.WARNING):
        text = await answer(bot, "agents deploy")
    assert "tagged-1" in text and "clustered-1" in text and "old-1" in text
    assert "other-1" not in text
    assert "/clusters/78088c9a-6e72-4896-848d-e6f479f50c24/queues/" in text
    assert sum(odd["id"] in w for w in warnings(caplog)) == 1, warnings(caplog)


async def test_the_health_digest_reads_past_an_odd_build(bot: BotClient, bk: FakeBuildkite) -> None:
    bk.add_pipeline("web")
    start = datetime.now(UTC) - timedelta(hours=1)
    author: str | dict[str, Any]
    for author in ("dev@example.com", {}):
        build = bk.add_build("web", state="passed", author=author)
        build["started_at"], build["finished_at"] = iso(start), iso(start + timedelta(seconds=100))
    odd = bk.add_build("web", state="failed")
    odd["number"] = "three"
    text = await answer(bot, "health web 24h")
    assert "Build health of web" in text
    assert "web            2   100%" in text


# -- job outcomes ----------------------------------------------------------------------------------


async def test_a_failure_names_only_real_failures_and_tails_the_first_that_ran(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("web", steps=("Lint", "Test", "Flaky", "Deploy (main only)"))
    await bot.command("/deploy", "web")
    (root,) = await slack.wait_for(lambda: slack.posts(CHANNEL))
    ts = root.response["ts"]
    bk.set_build_state("web", 1, "failed", failed_jobs=["Test", "Flaky"])
    jobs = {job["name"]: job for job in bk.build("web", 1)["jobs"]}
    # Lint expired before an agent took it: a failure, but it never ran and has no log.
    jobs["Lint"].update(state="expired", started_at=None, exit_status=None)
    jobs["Flaky"]["soft_failed"] = True
    # Its `if:` was false: Buildkite marks the step broken, which is no failure.
    jobs["Deploy (main only)"].update(
        state="broken", broken_reason="conditional_failed", started_at=None, exit_status=None
    )
    bk.set_job_log(jobs["Test"]["id"], "TEST LOG: 3 examples, 1 failure\n")
    assert (await bot.webhook(bk.webhook_payload("web", 1))).status == 200
    (final,) = await slack.wait_for(
        lambda: [
            c
            for c in slack.posts(CHANNEL)
            if c.args.get("thread_ts") == ts and "failed" in c.args["text"]
        ]
    )
    text = final.args["text"]
    failed = text.split("*Failed jobs:*")[1]
    assert "Lint" in failed and "Test" in failed
    assert "Deploy (main only)" not in failed and "Flaky" not in failed
    assert "TEST LOG" in json.dumps(final.args["blocks"])
    logs = [r.api_path for r in bk.requests if r.api_path.endswith("/log")]
    assert logs == [f"{ORG}/pipelines/web/builds/1/jobs/{jobs['Test']['id']}/log"]


# -- webhooks --------------------------------------------------------------------------------------


async def test_a_webhook_whose_agent_and_job_cannot_be_read_still_updates_the_build(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("web")
    await bot.command("/deploy", "web")
    (root,) = await slack.wait_for(lambda: slack.posts(CHANNEL))
    bk.set_build_state("web", 1, "running")
    payload = bk.job_webhook_payload("web", 1, bk.build("web", 1)["jobs"][0]["id"], "job.started")
    payload["job"]["exit_status"] = "not a number"
    payload["agent"] = {"id": "a-1", "name": ["odd"], "created_at": "2015-05-09 21:05:59 UTC"}
    payload["build"]["author"] = "dev@example.com"
    payload["build"]["created_at"] = "2021-06-01 08:23:35 UTC"
    response = await bot.webhook(payload)
    assert response.status == 200
    assert json.loads(await response.text())["changed"] is True
    await slack.wait_for(
        lambda: "Running" in json.dumps(slack.message(CHANNEL, root.response["ts"])["blocks"])
    )


async def test_only_a_webhook_without_the_part_its_event_needs_is_refused(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("web")
    bk.add_build("web")
    payload = bk.webhook_payload("web", 1)
    payload["build"]["number"] = "one"
    assert (await bot.webhook(payload)).status == 400
    agent_event = {"event": "agent.connected", "agent": {"id": "a-1", "name": None}}
    assert (await bot.webhook(agent_event)).status == 400
    fine_agent = {"event": "agent.connected", "agent": bk.add_agent("ok-1")}
    assert (await bot.webhook(fine_agent)).status == 200


# -- clusters --------------------------------------------------------------------------------------


async def create(bot: BotClient, text: str) -> str:
    return await answer(bot, f"pipeline create {text}", user_id=ADMIN, user_name="admin")


def created(bk: FakeBuildkite) -> list[Any]:
    return [r.json for r in bk.requests if r.method == "POST" and r.api_path == f"{ORG}/pipelines"]


async def test_a_pipeline_joins_the_organizations_only_cluster(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    cluster = bk.add_cluster()
    await bot.command(
        "/buildkite", "pipeline create web git@github.com:acme/web.git default", user_id=ADMIN
    )
    (body,) = await slack.wait_for(lambda: created(bk))
    assert body["cluster_id"] == cluster["id"]
    assert bk.pipelines["web"]["cluster_id"] == cluster["id"]


async def test_with_several_clusters_the_error_names_the_setting_to_add(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_cluster("Linux")
    bk.add_cluster("macOS")
    text = await create(bot, "web git@github.com:acme/web.git default")
    assert "`BUILDKITE_CLUSTER_ID`" in text
    assert created(bk) == []


async def test_the_cluster_setting_and_a_templates_own_cluster(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, policy: str
) -> None:
    linux, mac = bk.add_cluster("Linux"), bk.add_cluster("macOS")
    templates = json.dumps({"default": STEPS, "ios": {"cluster_id": mac["id"], "steps": STEPS}})
    async with running_bot(
        slack,
        bk,
        redis_url,
        policy_file=policy,
        pipeline_templates=templates,
        buildkite_cluster_id=linux["id"],
    ) as bot:
        await bot.command(
            "/buildkite", "pipeline create web git@github.com:acme/web.git default", user_id=ADMIN
        )
        await bot.command(
            "/buildkite", "pipeline create app git@github.com:acme/app.git ios", user_id=ADMIN
        )
        bodies = await slack.wait_for(lambda: len(created(bk)) == 2 and created(bk))
        assert bodies
    assert {b["name"]: b["cluster_id"] for b in bodies} == {"web": linux["id"], "app": mac["id"]}
    assert not any(r.api_path.endswith("/clusters") for r in bk.requests)
