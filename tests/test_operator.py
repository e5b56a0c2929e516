"""/buildkite end to end: pipelines, builds, agents and whoami, read and changed from Slack.

The real bot on a real port, driven with signed Slack requests, against the Slack and Buildkite
fakes and a real Redis; the assertions are on what reached the fakes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.core.commands import PipelineUpdate, parse_admin
from app.simulators import slack_requests
from app.simulators.bot import (
    BUILDKITE_TOKEN,
    SIGNING_SECRET,
    BotClient,
    running_bot,
    work_requests,
)
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

CHANNEL = "C0CHAN"
ALICE, ADMIN, OPS = "U0USER", "U0ADMIN", "U0OPS"
ORG = "/organizations/acme"
STEPS = "steps:\n  - label: Test\n    command: make test\n"
POLICY = "admins: [U0ADMIN]\nagent_stoppers: [S0OPS]\n"


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(ADMIN, "admin", "admin@example.com")
    slack.add_user(OPS, "ops", "ops@example.com")
    slack.add_usergroup("S0OPS", [OPS])
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(
        slack,
        bk,
        redis_url,
        policy_file=str(policy),
        pipeline_templates={"default": STEPS, "docker": "steps:\n  - command: docker build .\n"},
    ) as client:
        bk.clear_requests()
        yield client


async def answer(bot: BotClient, text: str, **kwargs: Any) -> dict[str, Any]:
    """/buildkite <text>; the first answer posted to its response_url."""
    _, name, _ = await bot.command("/buildkite", text, **kwargs)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return posts[0].json


async def click(
    bot: BotClient, action_id: str, value: str, user: str = ALICE, name: str = "alice"
) -> dict[str, Any]:
    _, response = await bot.click(
        action_id,
        value,
        channel=CHANNEL,
        message_ts="1700000000.000100",
        user_id=user,
        user_name=name,
        ephemeral=True,  # every /buildkite answer is only for the person who asked
    )
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == response])
    return posts[0].json


def elements(blocks: list[dict[str, Any]], action_id: str) -> list[dict[str, Any]]:
    return [
        element
        for block in blocks
        for element in block.get("elements", [])
        if element.get("action_id") == action_id
    ]


def value_of(reply: dict[str, Any], action_id: str) -> str:
    (element,) = elements(reply["blocks"], action_id)
    return str(element["value"])


def text_of(reply: dict[str, Any]) -> str:
    return json.dumps(reply.get("blocks", [])) + str(reply.get("text", ""))


def changes(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def submit(bot: BotClient, view: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """Submit a modal the bot opened, with `{block_id: text}`; returns Slack's HTTP answer."""
    body, headers = slack_requests.view_submission(
        view["callback_id"],
        {block: {"value": text} for block, text in values.items()},
        view["private_metadata"],
        view=view,
        signing_secret=SIGNING_SECRET,
        user_id=ADMIN,
        user_name="admin",
    )
    async with bot.http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        assert resp.status == 200
        raw = await resp.read()
    return json.loads(raw) if raw else {}


# -- help ----------------------------------------------------------------------------------------


async def test_help_lists_every_subcommand_with_an_example(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    _, _, ack = await bot.command("/buildkite", "")
    for sub in (
        "pipelines",
        "pipeline create",
        "pipeline update",
        "pipeline delete",
        "builds",
        "build",
        "agents",
        "whoami",
        "health",
    ):
        assert f"`/buildkite {sub}" in ack["text"], sub
    assert ack["text"].count("e.g.") >= 8
    assert "Templates: `default`, `docker`" in ack["text"]
    _, _, ack = await bot.command("/buildkite", "frobnicate")
    assert "`frobnicate` is not a /buildkite subcommand" in ack["text"]
    assert "*Usage:* `/buildkite" in ack["text"]
    assert work_requests(bk) == []


# -- pipelines -------------------------------------------------------------------------------------


async def test_pipelines_are_listed_a_page_at_a_time(bot: BotClient, bk: FakeBuildkite) -> None:
    for n in range(1, 24):
        bk.add_pipeline(f"p{n:02}", default_branch="trunk" if n == 1 else "main")
    bk.add_build("p01", state="passed")
    bk.add_build("p01", state="failed", failed_jobs=["Test"])

    first = await answer(bot, "pipelines")
    assert first["response_type"] == "ephemeral"
    text = text_of(first)
    assert [f"p{n:02}" for n in range(1, 11)] == [
        slug for slug in (f"p{n:02}" for n in range(1, 24)) if f"|{slug}>*" in text
    ]
    assert "`trunk`" in text
    assert "last build :x: <https://buildkite.com/acme/p01/builds/2|p01 #2>" in text
    assert "no builds yet" in text
    # One request for the pipelines, one for the newest builds (all of them: fewer than 100).
    assert "This page cost 2 Buildkite API requests." in text
    listed = [(r.api_path, r.param("per_page"), r.param("exclude_jobs")) for r in bk.requests]
    assert listed == [(f"{ORG}/pipelines", "11", None), (f"{ORG}/builds", "100", "true")]

    bk.clear_requests()
    second = await click(bot, "pipelines_more", value_of(first, "pipelines_more"))
    assert second["replace_original"] is True
    assert "|p11>*" in text_of(second) and "|p20>*" in text_of(second)
    assert "|p10>*" not in text_of(second)
    third = await click(bot, "pipelines_more", value_of(second, "pipelines_more"))
    assert "|p21>*" in text_of(third) and "|p23>*" in text_of(third)
    assert elements(third["blocks"], "pipelines_more") == []

    filtered = await answer(bot, "pipelines p1")
    assert [f"p{n}" for n in range(10, 20)] == [
        f"p{n}" for n in range(1, 24) if f"|p{n}>*" in text_of(filtered)
    ]
    assert elements(filtered["blocks"], "pipelines_more") == []


async def test_pipelines_without_a_recent_build_cost_one_request_each(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    for n in range(1, 4):
        bk.add_pipeline(f"p{n:02}")
    old = datetime.now(UTC) - timedelta(days=3)
    bk.add_build("p02", state="passed", created_at=old)
    for _ in range(100):
        bk.add_build("p01", state="passed")
    reply = await answer(bot, "pipelines")
    assert "last build :white_check_mark: <https://buildkite.com/acme/p02/builds/1|p02 #1>" in (
        text_of(reply)
    )
    assert "This page cost 4 Buildkite API requests." in text_of(reply)
    singles = [r for r in bk.requests if r.param("per_page") == "1"]
    assert sorted(r.api_path for r in singles) == [
        f"{ORG}/pipelines/p02/builds",
        f"{ORG}/pipelines/p03/builds",
    ]


async def test_a_forged_more_button_is_refused(bot: BotClient, bk: FakeBuildkite) -> None:
    for value in ('{"page": 0}', '{"page": 2, "filter": "../x"}', '{"page": 2, "x": 1}', "nope"):
        reply = await click(bot, "pipelines_more", value)
        assert "This button's data is not valid" in reply["text"]
    reply = await click(bot, "builds_more", '{"page": 2, "branch": "a..b"}')
    assert "This button's data is not valid" in reply["text"]
    assert work_requests(bk) == []


# -- builds ----------------------------------------------------------------------------------------


async def test_builds_across_the_organisation_and_of_one_pipeline(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("deploy-prod")
    bk.add_pipeline("web")
    start = datetime.now(UTC) - timedelta(hours=1)
    for n in range(12):
        build = bk.add_build("web", state="passed", message=f"Change {n}")
        build["started_at"], build["finished_at"] = iso(start), iso(start + timedelta(seconds=75))
    failed = bk.add_build("deploy-prod", state="failed", failed_jobs=["Deploy"], branch="main")
    failed["started_at"], failed["finished_at"] = iso(start), iso(start + timedelta(minutes=61))

    everything = await answer(bot, "builds")
    text = text_of(everything)
    assert ":x: <https://buildkite.com/acme/deploy-prod/builds/1|deploy-prod #1>" in text
    assert "1h 1m" in text and "1m 15s" in text
    assert "Change 11" in text and "Change 3" in text and "Change 2" not in text
    assert "This page cost 1 Buildkite API request." in text
    (request,) = bk.requests
    assert request.api_path == f"{ORG}/builds"
    assert (request.param("per_page"), request.param("exclude_jobs")) == ("11", "true")

    more = await click(bot, "builds_more", value_of(everything, "builds_more"))
    assert "Change 2" in text_of(more) and "Change 0" in text_of(more)
    assert elements(more["blocks"], "builds_more") == []

    bk.clear_requests()
    one = await answer(bot, "builds deploy-prod failed main")
    assert "Recent builds of `deploy-prod`, state `failed`, branch `main`" in text_of(one)
    (request,) = bk.requests
    assert request.api_path == f"{ORG}/pipelines/deploy-prod/builds"
    assert (request.params("state[]"), request.param("branch")) == (["failed"], "main")

    missing = await answer(bot, "builds nope")
    assert "Pipeline `nope` was not found" in missing["text"]


async def test_one_build_shows_its_jobs_and_the_tracked_builds_buttons(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("deploy-prod", steps=("Test", "Deploy"))
    bk.add_build("deploy-prod", state="running")
    reply = await answer(bot, "build https://buildkite.com/acme/deploy-prod/builds/1")
    text = text_of(reply)
    assert "*Jobs*" in text and "Test" in text and "Deploy" in text
    assert [e["text"]["text"] for e in elements(reply["blocks"], "build_cancel")] == ["Cancel"]
    assert elements(reply["blocks"], "build_open")[0]["url"].endswith("/deploy-prod/builds/1")

    # The Cancel button is the tracked build's, handled by the deploy listeners.
    await click(bot, "build_cancel", value_of(reply, "build_cancel"))
    assert [r.api_path for r in changes(bk)] == [f"{ORG}/pipelines/deploy-prod/builds/1/cancel"]

    finished = await answer(bot, "build deploy-prod 1")
    assert elements(finished["blocks"], "build_rebuild") != []
    assert elements(finished["blocks"], "build_cancel") == []


# -- agents ----------------------------------------------------------------------------------------


async def test_agents_are_listed_with_their_job_and_paginated(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("web")
    build = bk.add_build("web", state="running")
    agents = [
        bk.add_agent(f"agent-{n:02}", queue="deploy" if n < 3 else "default") for n in range(12)
    ]
    agents[1]["job"] = build["jobs"][0]

    reply = await answer(bot, "agents")
    text = text_of(reply)
    assert "agent-00" in text and "agent-09" in text and "agent-10" not in text
    assert "queue `deploy`" in text and "v3.87.0" in text
    assert f"busy on <{build['jobs'][0]['web_url']}|Test>" in text
    assert text.count(":white_circle: idle") == 9
    assert len(elements(reply["blocks"], "agent_stop")) == 10
    force = elements(reply["blocks"], "agent_force_stop")[0]
    assert force["confirm"]["confirm"]["text"] == "Force stop"
    assert "This page cost 1 Buildkite API request." in text

    more = await click(bot, "agents_more", value_of(reply, "agents_more"))
    assert "agent-10" in text_of(more) and "agent-11" in text_of(more)

    queue = await answer(bot, "agents deploy")
    assert [f"agent-{n:02}" for n in range(3)] == [
        f"agent-{n:02}" for n in range(12) if f"|agent-{n:02}>*" in text_of(queue)
    ]


async def test_stopping_agents_follows_the_policy(bot: BotClient, bk: FakeBuildkite) -> None:
    agent = bk.add_agent("builder-1")
    value = json.dumps({"id": agent["id"], "name": "builder-1"})
    stop_path = f"{ORG}/agents/{agent['id']}/stop"

    refused = await click(bot, "agent_stop", value)
    assert "Only these may stop agents: <@U0ADMIN>, <!subteam^S0OPS>" in refused["text"]
    assert changes(bk) == []

    done = await click(bot, "agent_stop", value, user=OPS, name="ops")
    assert "stop once its current job finishes" in done["text"]
    assert [(r.api_path, r.json) for r in changes(bk)] == [(stop_path, {"force": False})]

    # Buildkite stops only connected agents: an idle one asked to stop has stopped already.
    gone = await click(bot, "agent_force_stop", value, user=ADMIN, name="admin")
    assert "Can only stop connected agents" in gone["text"]

    other = bk.add_agent("builder-2")
    value = json.dumps({"id": other["id"], "name": "builder-2"})
    forced = await click(bot, "agent_force_stop", value, user=ADMIN, name="admin")
    assert "Force-stopped `builder-2`" in forced["text"]
    assert changes(bk)[-1].json == {"force": True}

    again = await click(bot, "agent_force_stop", value, user=ADMIN, name="admin")
    assert "already asked for this" in again["text"]
    assert len(changes(bk)) == 3


# -- whoami ----------------------------------------------------------------------------------------


async def test_whoami_warns_about_missing_scopes_and_never_shows_the_token(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.scopes.remove("write_agents")
    bk.scopes.remove("read_user")
    bk.scopes.remove("read_clusters")
    reply = await answer(bot, "whoami")
    text = reply["text"]
    assert "*Organisation:* <https://buildkite.com/acme|Acme> (`acme`)" in text
    assert "unknown (the token lacks `read_user`)" in text
    assert "`read_builds`" in text and "`write_pipelines`" in text
    warning = text.split("lacks scopes the bot needs", 1)[1]
    assert "• `write_agents`: the agents' Stop buttons" in warning
    assert "• `read_user`: `/buildkite whoami` (the token's owner)" in warning
    assert "• `read_clusters`: `/buildkite pipeline create` on a clustered organisation" in warning
    assert "read_builds" not in warning
    assert [r.api_path for r in bk.requests] == ["/access-token", ORG, "/user"]

    bk.scopes.append("read_user")
    reply = await answer(bot, "whoami")
    assert "*API token of:* ChatOps Bot (chatops-bot@example.com)" in reply["text"]
    everything = json.dumps([c.args for c in slack.calls]) + json.dumps(
        [p.json for p in slack.responses]
    )
    assert BUILDKITE_TOKEN not in everything and bk.token not in everything


# -- changing pipelines ----------------------------------------------------------------------------


async def test_an_admin_creates_a_pipeline_from_a_template(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await bot.command(
        "/buildkite",
        "pipeline create web git@github.com:acme/web.git default",
        user_id=ADMIN,
        user_name="admin",
    )
    (create,) = await slack.wait_for(lambda: changes(bk))
    assert (create.method, create.api_path) == ("POST", f"{ORG}/pipelines")
    assert create.json == {
        "name": "web",
        "repository": "git@github.com:acme/web.git",
        "configuration": STEPS,
    }
    post = await slack.wait_for(lambda: slack.posts(CHANNEL))
    assert post[0].args["text"] == (
        ":building_construction: <@U0ADMIN> created the pipeline "
        "<https://buildkite.com/acme/web|web> from the template `default`."
    )


async def test_pipeline_changes_are_for_admins(bot: BotClient, bk: FakeBuildkite) -> None:
    bk.add_pipeline("web")
    for text in (
        "pipeline create web git@github.com:acme/web.git default",
        "pipeline create",
        "pipeline update web description=x",
        "pipeline delete web",
    ):
        reply = await answer(bot, text)
        assert reply["text"].startswith(":no_entry: Only admins may "), text
        assert "<@U0ADMIN>" in reply["text"]
    reply = await click(bot, "pipeline_delete", '{"pipeline": "web"}')
    assert "Only admins may delete pipelines" in reply["text"]
    assert work_requests(bk) == []
    assert bot.slack.calls_to("views.open") == []


async def test_without_admins_pipeline_changes_and_stops_are_refused_with_how_to(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    agent = bk.add_agent("builder-1")
    async with running_bot(slack, bk, redis_url, pipeline_templates={"default": STEPS}) as bot:
        bk.clear_requests()
        reply = await answer(bot, "pipeline create web git@github.com:acme/web.git default")
        assert (
            "Only admins may create pipelines, and the deploy policy names none" in (reply["text"])
        )
        assert "under `admins:` in the policy file (`(no policy file)`" in reply["text"]
        value = json.dumps({"id": agent["id"], "name": "builder-1"})
        reply = await click(bot, "agent_force_stop", value)
        assert "under `admins:` or `agent_stoppers:`" in reply["text"]
        assert work_requests(bk) == []


async def test_a_pipeline_created_from_steps_pasted_in_a_form(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await bot.command(
        "/buildkite",
        "pipeline create web git@github.com:acme/web.git",
        user_id=ADMIN,
        user_name="admin",
    )
    (opened,) = await slack.wait_for(lambda: slack.calls_to("views.open"))
    view = copy.deepcopy(slack.views[opened.response["view"]["id"]])
    assert view["callback_id"] == "pipeline_create"
    initial = {
        b["block_id"]: b["element"].get("initial_value")
        for b in view["blocks"]
        if b["type"] == "input"
    }
    assert initial["name"] == "web" and initial["steps"] == STEPS
    assert initial["repository"] == "git@github.com:acme/web.git"

    answer_ = await submit(
        bot,
        view,
        {"name": "web", "repository": "not a url", "steps": "steps: [", "default_branch": ""},
    )
    assert answer_["response_action"] == "errors"
    assert set(answer_["errors"]) == {"repository", "steps"}
    assert "not valid YAML" in answer_["errors"]["steps"]
    assert changes(bk) == []

    steps = "steps:\n  - command: make check\n"
    answer_ = await submit(
        bot,
        view,
        {
            "name": "web",
            "repository": "https://github.com/acme/web.git",
            "default_branch": "trunk",
            "steps": steps,
        },
    )
    assert answer_["response_action"] == "update"
    (create,) = await slack.wait_for(lambda: changes(bk))
    assert create.json == {
        "name": "web",
        "repository": "https://github.com/acme/web.git",
        "configuration": steps.strip(),
        "default_branch": "trunk",
    }
    updated = await slack.wait_for(lambda: slack.calls_to("views.update"))
    assert "Created <https://buildkite.com/acme/web|web>" in json.dumps(updated[-1].args["view"])
    await slack.wait_for(lambda: slack.posts(CHANNEL))

    # Buildkite refuses a second pipeline of that name: the form comes back with the reason.
    await bot.command("/buildkite", "pipeline create", user_id=ADMIN, user_name="admin")
    opened = (await slack.wait_for(lambda: slack.calls_to("views.open")[1:]))[0]
    view = copy.deepcopy(slack.views[opened.response["view"]["id"]])
    await submit(
        bot, view, {"name": "web", "repository": "https://github.com/acme/web.git", "steps": steps}
    )
    again = await slack.wait_for(
        lambda: [
            c for c in slack.calls_to("views.update") if "already_exists" in json.dumps(c.args)
        ]
    )
    assert again[0].args["view"]["callback_id"] == "pipeline_create"


async def test_a_pipeline_is_updated_by_fields_or_in_a_form(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("web")
    await bot.command(
        "/buildkite",
        "pipeline update web description=Our “web” app default_branch=trunk",
        user_id=ADMIN,
        user_name="admin",
    )
    (patch,) = await slack.wait_for(lambda: changes(bk))
    assert (patch.method, patch.api_path) == ("PATCH", f"{ORG}/pipelines/web")
    assert patch.json == {"description": "Our “web” app", "default_branch": "trunk"}
    post = await slack.wait_for(lambda: slack.posts(CHANNEL))
    assert (
        "<@U0ADMIN> changed the pipeline <https://buildkite.com/acme/web|web>"
        in (post[0].args["text"])
    )

    _, _, ack = await bot.command("/buildkite", "pipeline update web colour=red", user_id=ADMIN)
    assert "`colour=red` is not a field to change" in ack["text"]

    await bot.command("/buildkite", "pipeline update web", user_id=ADMIN, user_name="admin")
    (opened,) = await slack.wait_for(lambda: slack.calls_to("views.open"))
    view = copy.deepcopy(slack.views[opened.response["view"]["id"]])
    assert view["callback_id"] == "pipeline_update"
    values = {"repository": "git@github.com:acme/web.git", "default_branch": "a..b"}
    assert (await submit(bot, view, values))["errors"].keys() == {"default_branch"}
    values["default_branch"] = "release"
    assert (await submit(bot, view, values))["response_action"] == "update"
    await slack.wait_for(lambda: len(changes(bk)) == 2)
    assert changes(bk)[-1].json == {
        "repository": "git@github.com:acme/web.git",
        "default_branch": "release",
    }


async def test_a_pipeline_is_deleted_after_a_confirmation(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("old-service")
    ask = await answer(bot, "pipeline delete old-service", user_id=ADMIN, user_name="admin")
    assert "cannot be undone" in text_of(ask)
    (button,) = elements(ask["blocks"], "pipeline_delete")
    assert button["style"] == "danger" and button["confirm"]["confirm"]["text"] == "Delete"
    assert changes(bk) == []

    done = await click(bot, "pipeline_delete", button["value"], user=ADMIN, name="admin")
    assert done["replace_original"] is True
    assert "Deleted the pipeline `old-service`" in done["text"]
    assert [(r.method, r.api_path) for r in changes(bk)] == [
        ("DELETE", f"{ORG}/pipelines/old-service")
    ]
    assert "old-service" not in bk.pipelines
    post = await slack.wait_for(lambda: slack.posts(CHANNEL))
    assert "<@U0ADMIN> deleted the pipeline `old-service`" in post[0].args["text"]

    missing = await answer(bot, "pipeline delete old-service", user_id=ADMIN)
    assert "Pipeline `old-service` was not found" in missing["text"]


def test_update_fields_are_cut_after_the_slug_even_when_a_word_contains_it() -> None:
    request = parse_admin(
        "pipeline update date description=Dates &amp; times default_branch=main",
        org="acme",
        templates={},
    )
    assert request == PipelineUpdate(
        "date", {"description": "Dates & times", "default_branch": "main"}
    )
