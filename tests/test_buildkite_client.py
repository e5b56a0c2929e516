"""BuildkiteClient against the fake Buildkite over loopback HTTP: one test per endpoint at least.

Each test asserts the request exactly as the fake recorded it (method, path, query, body, auth).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from app.simulators.buildkite import FakeBuildkite, RecordedRequest
from buildkite.client import (
    REQUEST_ID_META_KEY,
    SOURCE_META_KEY,
    SOURCE_META_VALUE,
    BuildkiteClient,
)
from buildkite.errors import BadRequest, PermissionDenied, RateLimited, ValidationFailed
from buildkite.models import Author, BuildState

ORG = "/v2/organizations/acme"
PIPE = f"{ORG}/pipelines/deploy-prod"
STEPS = "steps:\n  - command: make test\n"


class Sleeps:
    """An injected ``sleep`` that records what it was asked to wait, and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
async def bk() -> AsyncIterator[FakeBuildkite]:
    async with FakeBuildkite() as fake:
        fake.add_pipeline("deploy-prod")
        yield fake
        assert fake.unexpected == []


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def client(bk: FakeBuildkite, sleeps: Sleeps) -> AsyncIterator[BuildkiteClient]:
    async with BuildkiteClient(bk.token, bk.org, base_url=bk.url, sleep=sleeps) as bk_client:
        yield bk_client


def only(bk: FakeBuildkite) -> RecordedRequest:
    """The single request the fake received, checked for the bearer token."""
    assert len(bk.requests) == 1, [f"{r.method} {r.path}" for r in bk.requests]
    request = bk.requests[0]
    assert request.headers["Authorization"] == "Bearer bk-test-token"
    return request


# Builds


async def test_create_build_sends_the_full_body(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    build = await client.create_build(
        "deploy-prod",
        commit="abc123",
        branch="main",
        message="Deploy from Slack",
        author=Author(name="Ada Lovelace", email="ada@example.com"),
        env={"DEPLOY_ENV": "production"},
        meta_data={"slack_user": "U123"},
        clean_checkout=True,
        request_id="req-1",
    )

    request = only(bk)
    assert (request.method, request.path, request.query) == ("POST", f"{PIPE}/builds", [])
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"].startswith("buildkite-slack-chatops/")
    assert request.json == {
        "commit": "abc123",
        "branch": "main",
        "message": "Deploy from Slack",
        "author": {"name": "Ada Lovelace", "email": "ada@example.com"},
        "env": {"DEPLOY_ENV": "production"},
        "meta_data": {
            "slack_user": "U123",
            "chatops_request_id": "req-1",
            "chatops_source": "slack",
        },
        "clean_checkout": True,
    }
    assert build.number == 1
    assert build.state is BuildState.SCHEDULED
    assert build.web_url == "https://buildkite.com/acme/deploy-prod/builds/1"
    assert build.pipeline_slug == "deploy-prod"
    assert build.meta_data[REQUEST_ID_META_KEY] == "req-1"
    assert [job.name for job in build.jobs] == ["Test", "Deploy"]
    assert build.author is not None and build.author.email == "ada@example.com"


async def test_create_build_stamps_a_fresh_request_id(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    await client.create_build("deploy-prod", commit="HEAD", branch="main")
    await client.create_build("deploy-prod", commit="HEAD", branch="main")

    first, second = (request.json for request in bk.requests)
    assert set(first) == {"commit", "branch", "meta_data"}
    ids = [body["meta_data"][REQUEST_ID_META_KEY] for body in (first, second)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids[0] != ids[1]
    assert first["meta_data"][SOURCE_META_KEY] == SOURCE_META_VALUE
    assert [build["number"] for build in bk.builds_of("deploy-prod")] == [1, 2]


async def test_create_build_may_not_override_the_request_id(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    await client.create_build(
        "deploy-prod",
        commit="HEAD",
        branch="main",
        meta_data={REQUEST_ID_META_KEY: "spoofed", SOURCE_META_KEY: "cli"},
        request_id="mine",
    )
    assert only(bk).json["meta_data"] == {REQUEST_ID_META_KEY: "mine", SOURCE_META_KEY: "slack"}


async def test_get_build(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_build("deploy-prod", state="failed", failed_jobs=["Test"])

    build = await client.get_build("deploy-prod", 1)

    request = only(bk)
    assert (request.method, request.path, request.query) == ("GET", f"{PIPE}/builds/1", [])
    assert request.body == b""
    assert build.state is BuildState.FAILED
    assert build.is_final
    assert [job.name for job in build.failed_jobs] == ["Test"]
    assert build.failed_jobs[0].exit_status == 1


async def test_cancel_build(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_build("deploy-prod", state="running")

    build = await client.cancel_build("deploy-prod", 1)

    request = only(bk)
    assert (request.method, request.path, request.body) == ("PUT", f"{PIPE}/builds/1/cancel", b"")
    assert build.state is BuildState.CANCELED
    assert bk.build("deploy-prod", 1)["state"] == "canceled"


async def test_cancel_of_a_finished_build_is_refused(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.add_build("deploy-prod", state="passed")

    with pytest.raises(ValidationFailed) as caught:
        await client.cancel_build("deploy-prod", 1)

    assert caught.value.message == "Build can't be canceled because it's already finished"
    assert len(bk.requests) == 1


async def test_rebuild_returns_the_new_build(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_build("deploy-prod", state="failed", commit="c0ffee", branch="release", env={"A": "1"})

    build = await client.rebuild_build("deploy-prod", 1)

    request = only(bk)
    assert (request.method, request.path, request.body) == ("PUT", f"{PIPE}/builds/1/rebuild", b"")
    assert build.number == 2
    assert build.rebuilt_from is not None and build.rebuilt_from.number == 1
    assert (build.commit, build.branch, build.env) == ("c0ffee", "release", {"A": "1"})
    assert len(bk.builds_of("deploy-prod")) == 2


async def test_retry_failed_jobs(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_build("deploy-prod", state="failed", failed_jobs=["Deploy"])

    await client.retry_failed_jobs("deploy-prod", 1)

    request = only(bk)
    assert (request.method, request.path) == ("PUT", f"{PIPE}/builds/1/retry_failed_jobs")
    build = bk.build("deploy-prod", 1)
    assert build["state"] == "running"
    deploy_jobs = [job for job in build["jobs"] if job.get("name") == "Deploy"]
    assert [(job["retried"], job["state"]) for job in deploy_jobs] == [
        (True, "failed"),
        (False, "scheduled"),
    ]


async def test_list_builds_sends_every_filter(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    builds = [
        build
        async for build in client.list_builds(
            pipeline="deploy-prod",
            state=[BuildState.RUNNING, "finished"],
            branch="main",
            commit="abc123",
            created_from=datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
            finished_from=datetime(2024, 1, 2, tzinfo=timezone(timedelta(hours=2))),
            meta_data={"chatops_source": "slack"},
            exclude_jobs=True,
            exclude_pipeline=True,
            per_page=50,
        )
    ]

    request = only(bk)
    assert (request.method, request.path) == ("GET", f"{PIPE}/builds")
    assert request.query == [
        ("state[]", "running"),
        ("state[]", "finished"),
        ("branch", "main"),
        ("commit", "abc123"),
        ("created_from", "2024-01-02T03:04:05Z"),
        ("finished_from", "2024-01-01T22:00:00Z"),
        ("meta_data[chatops_source]", "slack"),
        ("exclude_jobs", "true"),
        ("exclude_pipeline", "true"),
        ("per_page", "50"),
    ]
    assert builds == []


async def test_list_builds_filters_are_applied(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_pipeline("docs")
    bk.add_build(
        "deploy-prod", state="running", branch="main", meta_data={"chatops_source": "slack"}
    )
    bk.add_build("deploy-prod", state="passed", branch="feature/x")
    bk.add_build("deploy-prod", state="failed", branch="main")
    bk.add_build("docs", state="scheduled", branch="main")

    async def numbers(**filters: Any) -> list[tuple[str | None, int]]:
        return [(b.pipeline_slug, b.number) async for b in client.list_builds(**filters)]

    assert await numbers() == [
        ("docs", 1),
        ("deploy-prod", 3),
        ("deploy-prod", 2),
        ("deploy-prod", 1),
    ]
    assert await numbers(pipeline="deploy-prod", state="finished") == [
        ("deploy-prod", 3),
        ("deploy-prod", 2),
    ]
    assert await numbers(branch=["feature/*", "nope"]) == [("deploy-prod", 2)]
    assert await numbers(meta_data={"chatops_source": "slack"}) == [("deploy-prod", 1)]
    assert await numbers(state=["scheduled", "running"], exclude_pipeline=True) == [
        (None, 1),
        (None, 1),
    ]
    paths = [r.path for r in bk.requests]
    assert paths == [
        f"{ORG}/builds",
        f"{PIPE}/builds",
        f"{ORG}/builds",
        f"{ORG}/builds",
        f"{ORG}/builds",
    ]
    assert bk.requests[2].params("branch[]") == ["feature/*", "nope"]


async def test_list_builds_across_organizations(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_build("deploy-prod")

    builds = [
        build async for build in client.list_builds(all_organizations=True, exclude_jobs=True)
    ]

    request = only(bk)
    assert (request.path, request.query) == (
        "/v2/builds",
        [("exclude_jobs", "true"), ("per_page", "100")],
    )
    assert [build.jobs for build in builds] == [[]]


async def test_list_builds_with_time_filters(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    bk.add_build("deploy-prod", created_at=long_ago, state="passed")
    bk.add_build("deploy-prod", state="running")

    recent = [b.number async for b in client.list_builds(created_from=long_ago + timedelta(days=1))]
    finished = [b.number async for b in client.list_builds(finished_from=long_ago)]

    assert recent == [2]
    assert finished == [1]


# Jobs


async def test_retry_job_returns_the_new_job(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    seeded = bk.add_build("deploy-prod", state="failed", failed_jobs=["Test"])
    failed_id = seeded["jobs"][0]["id"]

    job = await client.retry_job("deploy-prod", 1, failed_id)

    request = only(bk)
    assert (request.method, request.path) == ("PUT", f"{PIPE}/builds/1/jobs/{failed_id}/retry")
    assert request.body == b""
    assert (job.name, job.state, job.retries_count) == ("Test", "scheduled", 1)
    assert job.id != failed_id
    assert bk.build("deploy-prod", 1)["jobs"][0]["retried_in_job_id"] == job.id


async def test_retry_job_of_a_passed_job_is_a_bad_request(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    seeded = bk.add_build("deploy-prod", state="passed")

    with pytest.raises(BadRequest, match="Only failed, timed out or canceled jobs"):
        await client.retry_job("deploy-prod", 1, seeded["jobs"][0]["id"])


async def test_unblock_job(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_pipeline("release", block="Ship it?")
    seeded = bk.add_build("release", state="passed", blocked=True)
    block_id = seeded["jobs"][1]["id"]
    unblocker = "0183c4e6-c88c-4b42-b15e-7801077a9181"

    job = await client.unblock_job(
        "release", 1, block_id, fields={"release_name": "v1.2"}, unblocker=unblocker
    )

    request = only(bk)
    path = f"{ORG}/pipelines/release/builds/1/jobs/{block_id}/unblock"
    assert (request.method, request.path) == ("PUT", path)
    assert request.json == {"fields": {"release_name": "v1.2"}, "unblocker": unblocker}
    assert (job.type, job.state) == ("manual", "unblocked")
    build = bk.build("release", 1)
    assert (build["state"], build["blocked"]) == ("running", False)
    assert build["meta_data"] == {"release_name": "v1.2"}
    assert build["jobs"][2]["state"] == "scheduled"


async def test_unblock_job_without_fields_sends_an_empty_object(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.add_pipeline("release", block="Ship it?")
    seeded = bk.add_build("release", state="passed", blocked=True)

    await client.unblock_job("release", 1, seeded["jobs"][1]["id"])

    assert only(bk).json == {}


async def test_unblock_of_a_script_job_is_refused(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    seeded = bk.add_build("deploy-prod", state="running")

    with pytest.raises(ValidationFailed):
        await client.unblock_job("deploy-prod", 1, seeded["jobs"][0]["id"])


async def test_job_log_tail_asks_for_a_byte_range(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    job_id = bk.add_build("deploy-prod", state="failed", failed_jobs=["Test"])["jobs"][0]["id"]
    bk.set_job_log(job_id, "x" * 5000 + "\nerror: tests failed\n")

    tail = await client.job_log_tail("deploy-prod", 1, job_id, max_bytes=100)

    request = only(bk)
    assert (request.method, request.path) == ("GET", f"{PIPE}/builds/1/jobs/{job_id}/log")
    assert request.headers["Range"] == "bytes=-100"
    assert request.headers["Accept"] == "text/plain"
    assert tail == "x" * 79 + "\nerror: tests failed\n"


async def test_job_log_tail_drops_a_character_cut_in_half(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    job_id = bk.add_build("deploy-prod")["jobs"][0]["id"]
    bk.set_job_log(job_id, "é" * 10)  # two bytes each

    assert await client.job_log_tail("deploy-prod", 1, job_id, max_bytes=5) == "éé"


async def test_job_log_needs_the_read_build_logs_scope(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    job_id = bk.add_build("deploy-prod")["jobs"][0]["id"]
    bk.scopes.remove("read_build_logs")

    with pytest.raises(PermissionDenied) as caught:
        await client.job_log_tail("deploy-prod", 1, job_id)

    assert caught.value.missing_scope == "read_build_logs"


# Pipelines


async def test_list_pipelines_follows_pages(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_pipeline("api")
    bk.add_pipeline("web")

    slugs = [pipeline.slug async for pipeline in client.list_pipelines(per_page=2)]

    assert slugs == ["deploy-prod", "api", "web"]
    first, second = bk.requests
    assert (first.method, first.path, first.query) == (
        "GET",
        f"{ORG}/pipelines",
        [("per_page", "2")],
    )
    assert second.path == f"{ORG}/pipelines"
    assert sorted(second.query) == [("page", "2"), ("per_page", "2")]


async def test_get_pipeline(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    pipeline = await client.get_pipeline("deploy-prod")

    assert (only(bk).method, only(bk).path) == ("GET", PIPE)
    assert (pipeline.slug, pipeline.default_branch) == ("deploy-prod", "main")
    assert pipeline.repository == "git@github.com:acme/deploy-prod.git"


async def test_create_pipeline(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    pipeline = await client.create_pipeline(
        name="Docs Site",
        repository="git@github.com:acme/docs.git",
        configuration="steps:\n  - command: make docs\n",
        default_branch="trunk",
    )

    request = only(bk)
    assert (request.method, request.path) == ("POST", f"{ORG}/pipelines")
    assert request.json == {
        "name": "Docs Site",
        "repository": "git@github.com:acme/docs.git",
        "configuration": "steps:\n  - command: make docs\n",
        "default_branch": "trunk",
    }
    assert (pipeline.slug, pipeline.default_branch) == ("docs-site", "trunk")
    assert "docs-site" in bk.pipelines


async def test_update_pipeline(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    pipeline = await client.update_pipeline("deploy-prod", description="Ships it")

    request = only(bk)
    assert (request.method, request.path, request.json) == (
        "PATCH",
        PIPE,
        {"description": "Ships it"},
    )
    assert pipeline.description == "Ships it"


async def test_delete_pipeline(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    await client.delete_pipeline("deploy-prod")

    assert (only(bk).method, only(bk).path) == ("DELETE", PIPE)
    assert "deploy-prod" not in bk.pipelines


# Agents


async def test_list_agents_with_filters(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.add_agent("builder-1", hostname="ci-1", queue="deploy")
    bk.add_agent("builder-2", hostname="ci-2")

    agents = [agent async for agent in client.list_agents(hostname="ci-1", version="3.87.0")]

    request = only(bk)
    assert (request.method, request.path) == ("GET", f"{ORG}/agents")
    assert request.query == [("hostname", "ci-1"), ("version", "3.87.0"), ("per_page", "100")]
    assert [(agent.name, agent.queue) for agent in agents] == [("builder-1", "deploy")]


async def test_get_agent(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    agent_id = bk.add_agent("builder-1")["id"]

    agent = await client.get_agent(agent_id)

    assert (only(bk).method, only(bk).path) == ("GET", f"{ORG}/agents/{agent_id}")
    assert (agent.id, agent.name, agent.connection_state) == (agent_id, "builder-1", "connected")


@pytest.mark.parametrize("force", [False, True])
async def test_stop_agent(bk: FakeBuildkite, client: BuildkiteClient, force: bool) -> None:
    agent_id = bk.add_agent("builder-1")["id"]

    if force:
        await client.stop_agent(agent_id, force=True)
    else:
        await client.stop_agent(agent_id)  # graceful unless asked

    request = only(bk)
    assert (request.method, request.path) == ("PUT", f"{ORG}/agents/{agent_id}/stop")
    assert request.json == {"force": force}
    assert bk.agents[agent_id]["stop_requested"] == {"force": force}


# Organization, user, token


async def test_get_organization(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    organization = await client.get_organization()

    assert (only(bk).method, only(bk).path) == ("GET", ORG)
    assert organization.slug == "acme"


async def test_get_user(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    user = await client.get_user()

    assert (only(bk).method, only(bk).path) == ("GET", "/v2/user")
    assert (user.name, user.email) == ("ChatOps Bot", "chatops-bot@example.com")


async def test_get_access_token(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    bk.scopes = ["read_builds", "write_builds"]

    token = await client.get_access_token()

    assert (only(bk).method, only(bk).path) == ("GET", "/v2/access-token")
    assert token.scopes == ["read_builds", "write_builds"]


# Base URL and rate-limit bookkeeping


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_base_url_with_or_without_a_trailing_slash(bk: FakeBuildkite, suffix: str) -> None:
    async with BuildkiteClient(bk.token, "acme", base_url=bk.url + suffix) as bk_client:
        await bk_client.get_user()

    assert only(bk).path == "/v2/user"


async def test_rate_limit_headers_are_exposed(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    assert client.rate_limit_remaining is None
    assert client.rate_limit_limit is None

    await client.get_user()
    assert client.rate_limit_remaining == 199
    assert client.rate_limit_limit == 200
    await client.get_user()
    assert client.rate_limit_remaining == 198
    assert client.rate_limit_reset is not None and 0 < client.rate_limit_reset <= 60


async def test_a_shared_http_client_is_not_closed(bk: FakeBuildkite) -> None:
    import httpx

    async with httpx.AsyncClient() as http:
        async with BuildkiteClient(bk.token, "acme", base_url=bk.url, http=http) as bk_client:
            await bk_client.get_user()
        assert not http.is_closed
        response = await http.get(f"{bk.url}/user", headers={"Authorization": f"Bearer {bk.token}"})
        assert response.status_code == 200


async def test_requests_beyond_the_limit_wait_their_turn_instead_of_piling_up(
    bk: FakeBuildkite,
) -> None:
    # More requests queued inside httpx's pool than it has connections make every release
    # rescan the queue, which starves the event loop under a burst of deploys.
    bk.latency = 0.05
    async with BuildkiteClient(
        bk.token, bk.org, base_url=bk.url, max_concurrent_requests=3
    ) as bk_client:
        pipelines = await asyncio.gather(
            *(bk_client.get_pipeline("deploy-prod") for _ in range(12))
        )
    assert [p.slug for p in pipelines] == ["deploy-prod"] * 12
    assert len(bk.requests) == 12
    assert 1 <= bk.most_in_flight <= 3


def test_at_least_one_request_must_be_allowed_at_a_time(bk: FakeBuildkite) -> None:
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        BuildkiteClient(bk.token, bk.org, base_url=bk.url, max_concurrent_requests=0)


# -- real shapes: both rate-limit scopes, odd list items, clusters ---------------------------


async def test_both_rate_limit_scopes_are_tracked_and_the_tighter_is_reported(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.user_rate_limit = 50  # Buildkite's per-user limit, beside the organization's 200
    await client.get_user()
    org, user = client.rate_limits["organization"], client.rate_limits["user"]
    assert (org.remaining, org.limit) == (199, 200)
    assert (user.remaining, user.limit) == (49, 50)
    assert user.reset is not None and 0 < user.reset <= 60
    assert (client.rate_limit_remaining, client.rate_limit_limit) == (49, 50)


def _rate_limited_once(body: dict[str, Any], headers: dict[str, str]) -> Any:
    answers = iter(
        [
            httpx.Response(429, json=body, headers=headers),
            httpx.Response(200, json={"id": "u", "name": "Bot"}),
        ]
    )
    return httpx.MockTransport(lambda request: next(answers))


@pytest.mark.parametrize(
    ("body", "headers", "scope", "reset"),
    [
        # The body names the user scope: its reset, not the organization's, is waited.
        (
            {"message": "slow down", "scope": "rest_user", "limit": 50, "current": 55, "reset": 7},
            {"RateLimit-Reset": "50", "RateLimit-Remaining": "120", "RateLimit-User-Reset": "9"},
            "user",
            7,
        ),
        # No body scope: the headers of the scope with nothing left decide.
        (
            {"message": "slow down"},
            {
                "RateLimit-Reset": "50",
                "RateLimit-Remaining": "120",
                "RateLimit-User-Remaining": "0",
                "RateLimit-User-Reset": "4",
            },
            "user",
            4,
        ),
        (
            {"message": "slow down", "scope": "rest", "reset": 3},
            {"RateLimit-Reset": "30", "RateLimit-User-Reset": "40"},
            "organization",
            3,
        ),
    ],
)
async def test_a_429_waits_for_the_reset_of_the_scope_it_hit(
    body: dict[str, Any], headers: dict[str, str], scope: str, reset: float
) -> None:
    sleeps = Sleeps()
    transport = _rate_limited_once(body, headers)
    async with (
        httpx.AsyncClient(transport=transport) as http,
        BuildkiteClient("t", "acme", http=http, sleep=sleeps) as client,
    ):
        await client.get_user()
    (waited,) = sleeps.calls
    assert reset + 0.5 <= waited <= reset + 1.5
    assert client.rate_limits[scope].remaining == 0


async def test_a_429_given_up_on_names_its_scope_and_reset() -> None:
    body = {"message": "You have exceeded your API rate limit.", "scope": "rest_user", "reset": 42}
    transport = httpx.MockTransport(lambda request: httpx.Response(429, json=body))
    async with (
        httpx.AsyncClient(transport=transport) as http,
        BuildkiteClient("t", "acme", http=http, sleep=Sleeps(), max_rate_limit_wait=0) as client,
    ):
        with pytest.raises(RateLimited) as caught:
            await client.get_user()
    assert (caught.value.scope, caught.value.reset) == ("user", 42)


async def test_the_fakes_user_scope_429_is_waited_out(
    bk: FakeBuildkite, client: BuildkiteClient, sleeps: Sleeps
) -> None:
    bk.rate_limit_next(1, reset=5, scope="rest_user")
    await client.get_user()
    (waited,) = sleeps.calls
    assert 5.5 <= waited <= 6.5
    first = bk.requests[0]
    assert first.path == bk.requests[1].path == "/v2/user"


async def test_one_unreadable_build_is_skipped_with_one_warning_naming_it(
    bk: FakeBuildkite, client: BuildkiteClient, caplog: pytest.LogCaptureFixture
) -> None:
    good = bk.add_build("deploy-prod", author="dev@example.com", state="passed")
    odd = bk.add_build("deploy-prod", state="passed")
    odd["web_url"] = 42  # not a URL at all
    waiting = bk.add_build("deploy-prod")
    waiting["state"] = "waiting"
    good["started_at"] = "2021-06-01 08:23:35 UTC"
    with caplog.at_level(logging.WARNING, logger="buildkite"):
        builds = [b async for b in client.list_builds(pipeline="deploy-prod")]
    assert [b.number for b in builds] == [waiting["number"], good["number"]]
    assert builds[0].state.value == "waiting" and not builds[0].is_final
    assert builds[1].author is not None and builds[1].author.email == "dev@example.com"
    assert builds[1].started_at == datetime(2021, 6, 1, 8, 23, 35, tzinfo=UTC)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and odd["id"] in warnings[0] and "web_url" in warnings[0]


async def test_agents_read_their_queue_from_the_top_level_field(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    bk.add_agent("tagged", queue="deploy")
    clustered = bk.add_agent("clustered", queue="builds", cluster="c-1")
    assert not any(tag.startswith("queue=") for tag in clustered["meta_data"])
    queues = {a.name: a.queue async for a in client.list_agents()}
    assert queues == {"tagged": "deploy", "clustered": "builds"}


async def test_clusters_are_listed_and_cached(bk: FakeBuildkite, client: BuildkiteClient) -> None:
    cluster = bk.add_cluster("Default")
    assert [c.id for c in await client.list_clusters()] == [cluster["id"]]
    assert [c.id for c in await client.list_clusters()] == [cluster["id"]]
    assert [r.path for r in bk.requests] == [f"{ORG}/clusters"]


async def test_create_pipeline_sends_its_cluster(
    bk: FakeBuildkite, client: BuildkiteClient
) -> None:
    cluster = bk.add_cluster()
    with pytest.raises(ValidationFailed):
        await client.create_pipeline(name="web", repository="git@x:y.git", configuration=STEPS)
    created = await client.create_pipeline(
        name="web", repository="git@x:y.git", configuration=STEPS, cluster_id=cluster["id"]
    )
    assert created.cluster_id == cluster["id"]
    assert bk.last_request.json["cluster_id"] == cluster["id"]


def test_the_packages_export_every_name_their_callers_import() -> None:
    import buildkite.client
    import buildkite.models

    client_names = {
        "BuildkiteClient",
        "DEFAULT_BASE_URL",
        "MAX_PER_PAGE",
        "RateLimitBudget",
        "REQUEST_ID_META_KEY",
        "SOURCE_META_KEY",
        "SOURCE_META_VALUE",
        "StartLookup",
    }
    model_names = {
        "ACTIVE_STATES",
        "STATE_FILTERS",
        "AccessToken",
        "Agent",
        "Author",
        "Build",
        "BuildState",
        "Cluster",
        "Job",
        "Organization",
        "Pipeline",
        "PipelineRef",
        "User",
        "fields_at_fault",
        "item_id",
    }
    assert client_names <= set(buildkite.client.__all__)
    assert model_names <= set(buildkite.models.__all__)
    for name in buildkite.client.__all__:
        assert hasattr(buildkite.client, name), name
    for name in buildkite.models.__all__:
        assert hasattr(buildkite.models, name), name
