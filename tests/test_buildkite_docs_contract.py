"""Contract tests: every JSON example of Buildkite's REST API and webhook docs is read.

tests/data/buildkite-docs/ holds the docs' examples verbatim (see its SOURCE.txt). Each REST
response is served by a small test server at its endpoint and read through the client's public
methods; the ones the bot shows are then served by FakeBuildkite and rendered by the real bot;
every webhook body (its abbreviated objects filled with the docs' full REST objects, as a real
delivery carries them) is replayed to the bot. A file the bot never reads must say why below, so
a new example cannot be left out unnoticed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from buildkite.client import BuildkiteClient
from buildkite.errors import RateLimited
from buildkite.models import Build
from buildkite.webhooks import parse_webhook

DOCS = Path(__file__).parent / "data" / "buildkite-docs"
ORG = "my-great-org"
CHANNEL = "C0CHAN"

#: Examples of endpoints or payloads the bot never reads, and why.
NOT_READ = {
    "rest_api__01.json": "GET /v2 (the API's greeting)",
    "rest_api__02.json": "the API's linkset (OpenAPI of Test Engine only)",
    "rest_api__jobs__03.json": "remote access to a job's machine",
    "rest_api__jobs__04.json": "remote access to a job's machine",
    "rest_api__jobs__09.json": "a job's environment variables",
    "rest_api__meta__01.json": "webhook source IPs (the bot verifies tokens or signatures instead)",
    "rest_api__pipelines__08.json": "a pipeline's GitHub webhook settings",
    "rest_api__pipelines__09.json": "a pipeline's GitHub webhook settings",
    "rest_api__pipelines__10.json": "a pipeline's GitHub webhook settings",
    "webhooks__incoming__pipeline_triggers__01.json": "sent TO Buildkite, not to the bot",
    "webhooks__incoming__pipeline_triggers__02.json": "sent TO Buildkite, not to the bot",
    "webhooks__pipelines__job_events__04.json": "a fragment (retry_source), read in job_events__03",
}


def doc(name: str) -> Any:
    return json.loads((DOCS / name).read_text())


def one(name: str) -> dict[str, Any]:
    data = doc(name)
    return dict(data[0] if isinstance(data, list) else data)


# -- the REST examples, through the client ---------------------------------------------------------

BUILDS = f"/v2/organizations/{ORG}/pipelines/my-pipeline/builds"
JOB = "b63254c0-3271-4a98-8270-7cfbd6c2f14e"
MANUAL = "ded35de2-7de0-4da8-8daa-b4ce0b7f1064"


def build_with_every_job() -> dict[str, Any]:
    """The docs' "Get a build", with their other job examples among its jobs."""
    build = one("rest_api__builds__02.json")
    build["jobs"] = [
        *build["jobs"],
        doc("rest_api__builds__03.json"),
        *doc("rest_api__jobs__01.json")["items"],
        doc("rest_api__jobs__02.json"),
        doc("rest_api__jobs__05.json"),
        doc("rest_api__jobs__06.json"),
        doc("rest_api__jobs__07.json"),
    ]
    return build


#: (method, path) -> (status, file or body) for the test server.
ROUTES: dict[tuple[str, str], tuple[int, Any]] = {
    ("GET", f"/v2/organizations/{ORG}/builds"): (
        200,
        [one("rest_api__builds__01.json"), *(one(f"rest_api__builds__0{n}.json") for n in (4, 7))],
    ),
    ("GET", f"{BUILDS}/2"): (200, build_with_every_job()),
    ("POST", BUILDS): (201, one("rest_api__builds__04.json")),
    ("PUT", f"{BUILDS}/1/cancel"): (200, one("rest_api__builds__05.json")),
    ("PUT", f"{BUILDS}/2/rebuild"): (200, one("rest_api__builds__06.json")),
    ("PUT", f"{BUILDS}/2/jobs/{JOB}/retry"): (200, doc("rest_api__jobs__05.json")),
    ("PUT", f"{BUILDS}/1/jobs/{MANUAL}/unblock"): (200, doc("rest_api__jobs__07.json")),
    ("GET", f"{BUILDS}/1/jobs/{JOB}/log"): (200, doc("rest_api__jobs__08.json")),
    ("GET", f"/v2/organizations/{ORG}/agents"): (200, doc("rest_api__agents__01.json")),
    ("GET", f"/v2/organizations/{ORG}/agents/{one('rest_api__agents__02.json')['id']}"): (
        200,
        doc("rest_api__agents__02.json"),
    ),
    ("GET", f"/v2/organizations/{ORG}/pipelines"): (200, doc("rest_api__pipelines__01.json")),
    ("GET", f"/v2/organizations/{ORG}/pipelines/my-pipeline"): (
        200,
        doc("rest_api__pipelines__02.json"),
    ),
    ("POST", f"/v2/organizations/{ORG}/pipelines"): (201, doc("rest_api__pipelines__03.json")),
    ("GET", f"/v2/organizations/{ORG}"): (200, doc("rest_api__organizations__02.json")),
    ("GET", "/v2/user"): (200, doc("rest_api__user__01.json")),
    ("GET", "/v2/access-token"): (200, doc("rest_api__access_token__01.json")),
}


@pytest.fixture
async def docs_server() -> AsyncIterator[tuple[str, list[str], dict[str, Any]]]:
    """Serves ROUTES; answers anything else 599 and records it. Yields (base, unexpected,
    overrides): an override {"METHOD path": (status, body)} replaces a route for one test."""
    unexpected: list[str] = []
    overrides: dict[str, Any] = {}

    async def handle(request: web.Request) -> web.Response:
        key = (request.method, request.path)
        answer = overrides.get(f"{request.method} {request.path}") or ROUTES.get(key)
        if answer is None:
            unexpected.append(f"{request.method} {request.path_qs}")
            return web.json_response({"message": "unexpected"}, status=599)
        status, body = answer
        return web.json_response(copy.deepcopy(body), status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v2", unexpected, overrides
    finally:
        await runner.cleanup()
    assert unexpected == []


@pytest.fixture
async def client(
    docs_server: tuple[str, list[str], dict[str, Any]],
) -> AsyncIterator[BuildkiteClient]:
    async def no_sleep(seconds: float) -> None:
        return None

    async with BuildkiteClient(
        "token", ORG, base_url=docs_server[0], sleep=no_sleep, max_rate_limit_wait=0
    ) as bk_client:
        yield bk_client


def test_every_docs_example_is_covered_or_says_why_not() -> None:
    files = {path.name for path in DOCS.glob("*.json")}
    served = {name for name in files if name in COVERED}
    assert files - served - NOT_READ.keys() == set()
    assert served | NOT_READ.keys() <= files


COVERED: set[str] = set()


def covers(*names: str) -> Callable[[Any], Any]:
    COVERED.update(names)
    return lambda test: test


@covers(
    "rest_api__builds__01.json",
    "rest_api__builds__02.json",
    "rest_api__builds__03.json",
    "rest_api__builds__04.json",
    "rest_api__builds__05.json",
    "rest_api__builds__06.json",
    "rest_api__builds__07.json",
    "rest_api__jobs__01.json",
    "rest_api__jobs__02.json",
    "rest_api__jobs__05.json",
    "rest_api__jobs__06.json",
    "rest_api__jobs__07.json",
    "rest_api__jobs__08.json",
)
async def test_builds_and_jobs_examples_are_read_by_the_client(client: BuildkiteClient) -> None:
    listed = [build async for build in client.list_builds()]
    assert [(b.number, b.state.value) for b in listed] == [
        (1, "passed"),
        (1, "scheduled"),
        (2, "scheduled"),
    ]
    build = await client.get_build("my-pipeline", 2)
    names = [job.display_name for job in build.jobs]
    assert names == [
        "RSpec",
        "Deploy to production",
        ":package: Build",
        ":package: Build",
        ":package:",
        ":package:",
        "Deploy",
    ]
    manual = build.jobs[-1]
    assert (manual.type, manual.state, manual.web_url) == ("manual", "unblocked", None)
    assert "fields" not in type(manual).model_fields  # Buildkite never returns a step's fields
    assert build.failed_jobs == [] and build.log_tail_job is None
    created = await client.create_build("my-pipeline", commit="HEAD", branch="main")
    assert created.message == "Testing all the things :rocket:"
    assert (await client.cancel_build("my-pipeline", 1)).state.value == "canceled"
    assert (await client.rebuild_build("my-pipeline", 2)).number == 2
    assert (await client.retry_job("my-pipeline", 2, JOB)).retries_count == 1
    assert (await client.unblock_job("my-pipeline", 1, MANUAL)).state == "unblocked"
    assert await client.job_log_tail("my-pipeline", 1, JOB) == "This is the job's log output"


@covers("rest_api__agents__01.json", "rest_api__agents__02.json")
async def test_agent_examples_are_read_with_their_top_level_queue(
    client: BuildkiteClient,
) -> None:
    (agent,) = [a async for a in client.list_agents()]
    assert (agent.name, agent.queue, agent.is_busy) == ("my-agent", "default", True)
    fetched = await client.get_agent(agent.id)
    assert fetched.queue == "default" and fetched.job is not None


@covers(
    "rest_api__pipelines__01.json",
    "rest_api__pipelines__02.json",
    "rest_api__pipelines__03.json",
    "rest_api__pipelines__05.json",
    "rest_api__pipelines__06.json",
    "rest_api__pipelines__07.json",
)
async def test_pipeline_examples_are_read_with_both_time_formats(
    client: BuildkiteClient, docs_server: tuple[str, list[str], dict[str, Any]]
) -> None:
    (listed,) = [p async for p in client.list_pipelines()]
    assert listed.slug == "my-pipeline"
    assert (await client.get_pipeline("my-pipeline")).description is not None
    created = await client.create_pipeline(name="x", repository="git@x:y", configuration="")
    assert created.slug == "my-pipeline-x"
    overrides = docs_server[2]
    for name in ("rest_api__pipelines__05.json", "rest_api__pipelines__06.json"):
        overrides[f"PATCH /v2/organizations/{ORG}/pipelines/my-pipeline"] = (200, doc(name))
        updated = await client.update_pipeline("my-pipeline", repository="git@x:new")
        assert updated.repository == "git@github.com:acme-inc/new-repo.git"
    assert updated.archived_at is not None and updated.archived_at.year == 2021
    overrides[f"PATCH /v2/organizations/{ORG}/pipelines/my-pipeline"] = (
        200,
        doc("rest_api__pipelines__07.json"),
    )
    assert (await client.update_pipeline("my-pipeline", branch_configuration="main")).slug


@covers(
    "rest_api__organizations__01.json",
    "rest_api__organizations__02.json",
    "rest_api__user__01.json",
    "rest_api__access_token__01.json",
)
async def test_organization_user_and_token_examples_are_read(client: BuildkiteClient) -> None:
    organization = await client.get_organization()
    assert organization.slug == ORG
    assert doc("rest_api__organizations__01.json") == [doc("rest_api__organizations__02.json")]
    # Its created_at, "2012-03-04T56:07:08.910Z", is no time at all: the bot does not need it.
    assert (await client.get_user()).name == "John Smith"
    assert (await client.get_access_token()).scopes == ["read_build"]


@covers("rest_api__rate_limits__01.json")
async def test_the_429_example_names_the_user_scope_and_its_reset(
    client: BuildkiteClient, docs_server: tuple[str, list[str], dict[str, Any]]
) -> None:
    docs_server[2]["GET /v2/user"] = (429, doc("rest_api__rate_limits__01.json"))
    with pytest.raises(RateLimited) as caught:
        await client.get_user()
    assert (caught.value.scope, caught.value.reset) == ("user", 42)
    assert client.rate_limits["user"].remaining == 0


# -- what a user sees: the same examples rendered by the bot ---------------------------------------


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> AsyncIterator[BotClient]:
    async with running_bot(slack, bk, redis_url) as client:
        bk.clear_requests()
        yield client


async def answer(bot: BotClient, text: str) -> str:
    _, name, _ = await bot.command("/buildkite", text)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return json.dumps(posts[0].json.get("blocks", [])) + str(posts[0].json.get("text", ""))


async def test_the_docs_builds_agents_and_pipelines_show_up_in_slack(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    builds = [one(f"rest_api__builds__0{n}.json") for n in (1, 2, 4, 5, 6, 7)]
    bk.builds.extend(copy.deepcopy(builds))
    text = await answer(bot, "builds")
    assert text.count("|great-pipeline #") == len(builds)
    assert text.count(":white_check_mark:") == 2 and ":no_entry_sign:" in text
    assert "Testing all the things :rocket:" in text

    bk.pipelines["great-pipeline"] = one("rest_api__pipelines__01.json") | {
        "slug": "great-pipeline"
    }
    bk.builds[:] = [build_with_every_job() | {"pipeline": builds[1]["pipeline"]}]
    details = await answer(bot, "build great-pipeline 2")
    for name in ("RSpec", "Deploy to production", ":package: Build", "Deploy"):
        assert name in details
    assert "unblocked" in details

    agent = one("rest_api__agents__01.json")
    bk.agents[agent["id"]] = agent
    agents = await answer(bot, "agents default")
    assert "my-agent" in agents and "queue `default`" in agents and "rspec" in agents

    bk.builds.clear()
    for name in ("rest_api__pipelines__01.json", "rest_api__pipelines__03.json"):
        pipeline = one(name)
        bk.pipelines = {pipeline["slug"]: pipeline, **bk.pipelines}
    pipelines = await answer(bot, "pipelines")
    assert "my-pipeline" in pipelines and "my-pipeline-x" in pipelines
    assert bk.unexpected == []


# -- the webhook examples, replayed ----------------------------------------------------------------

#: The full REST object each abbreviated webhook object stands for.
FULL: dict[str, Callable[[], dict[str, Any]]] = {
    "build": lambda: {k: v for k, v in one("rest_api__builds__02.json").items() if k != "jobs"},
    "job": lambda: doc("rest_api__jobs__02.json"),
    "pipeline": lambda: doc("rest_api__pipelines__02.json"),
    "agent": lambda: doc("rest_api__agents__02.json"),
}


def filled(payload: dict[str, Any]) -> dict[str, Any]:
    """The docs' webhook body with each {"...": "..."} object completed by its REST example;
    keys the docs do show (like `blocked: true`) win."""
    body = copy.deepcopy(payload)
    for name, full in FULL.items():
        part = body.get(name)
        if isinstance(part, dict) and ("..." in part or "keys" in part):
            shown = {k: v for k, v in part.items() if k not in {"...", "keys"} and v != "..."}
            body[name] = {**full(), **shown}
    return body


BUILD_WEBHOOKS = [
    "webhooks__pipelines__01.json",
    "webhooks__pipelines__build_events__01.json",
    "webhooks__pipelines__build_events__02.json",
    "webhooks__pipelines__build_events__03.json",
    "webhooks__pipelines__job_events__01.json",
    "webhooks__pipelines__job_events__02.json",
    "webhooks__pipelines__job_events__03.json",
    "webhooks__pipelines__job_events__05.json",
]
OTHER_WEBHOOKS = [
    "webhooks__pipelines__agent_events__01.json",
    "webhooks__pipelines__agent_events__02.json",
    "webhooks__pipelines__agent_token_events__01.json",
    "webhooks__pipelines__ping_events__01.json",
]
covers(*BUILD_WEBHOOKS, *OTHER_WEBHOOKS)


@pytest.mark.parametrize("name", BUILD_WEBHOOKS)
async def test_each_build_and_job_webhook_example_updates_the_tracked_message(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, name: str
) -> None:
    bk.add_pipeline("my-pipeline")
    await bot.command("/deploy", "my-pipeline")
    (root,) = await slack.wait_for(lambda: slack.posts(CHANNEL))
    ours = bk.build("my-pipeline", 1)
    payload = filled(doc(name))
    # The build is ours: the docs' example under the id, number and URLs of the build the bot
    # follows; every other field is the docs' own.
    payload["build"].update({key: ours[key] for key in ("id", "number", "url", "web_url")})
    parse_webhook({"X-Buildkite-Event": payload["event"]}, json.dumps(payload).encode())
    response = await bot.webhook(payload)
    assert response.status == 200
    blocked = payload["build"].get("blocked") is True
    shown = "Waiting on a block step" if blocked else "Passed"
    await slack.wait_for(
        lambda: shown in json.dumps(slack.message(CHANNEL, root.response["ts"])["blocks"])
    )
    assert Build.model_validate(payload["build"]).is_final is not blocked


@pytest.mark.parametrize("name", OTHER_WEBHOOKS)
async def test_agent_token_and_ping_webhook_examples_are_accepted(
    bot: BotClient, name: str
) -> None:
    payload = filled(doc(name))
    event = parse_webhook({"X-Buildkite-Event": payload["event"]}, json.dumps(payload).encode())
    if "agent" in payload:
        assert event.agent is not None and event.agent.queue == "default"
    response = await bot.webhook(payload)
    assert response.status == 200
    assert json.loads(await response.text())["ignored"] == payload["event"]


def test_the_docs_examples_have_no_surprises_left() -> None:
    """A sanity check of the fill-in: no abbreviated object is left in a replayed webhook."""
    for name in BUILD_WEBHOOKS + OTHER_WEBHOOKS:
        body = filled(doc(name))
        for part in FULL:
            if part in body:
                assert "..." not in body[part], (name, part)
