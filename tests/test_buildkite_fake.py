"""The fake Buildkite itself: it must answer like Buildkite and fail loudly on surprises.

Other suites (the bot's end-to-end tests, benchmarks, the sandbox) rely on these behaviours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from app.simulators.buildkite import UNAUTHORIZED_MESSAGE, UNEXPECTED_STATUS, FakeBuildkite

ORG = "/organizations/acme"
PIPE = f"{ORG}/pipelines/deploy-prod"


@pytest.fixture
async def bk() -> AsyncIterator[FakeBuildkite]:
    async with FakeBuildkite() as fake:
        fake.add_pipeline("deploy-prod")
        yield fake
        assert fake.unexpected == []


@pytest.fixture
async def http(bk: FakeBuildkite) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {bk.token}"}
    async with httpx.AsyncClient(base_url=bk.url, headers=headers) as client:
        yield client


async def test_an_unknown_route_is_loud(bk: FakeBuildkite, http: httpx.AsyncClient) -> None:
    response = await http.get("/organizations/acme/teams")

    assert response.status_code == UNEXPECTED_STATUS
    assert "unexpected request" in response.json()["message"]
    assert bk.unexpected == ["GET /v2/organizations/acme/teams: no such endpoint"]
    bk.unexpected.clear()


async def test_an_unknown_method_is_loud(bk: FakeBuildkite, http: httpx.AsyncClient) -> None:
    response = await http.post(f"{PIPE}/builds/1/cancel")

    assert response.status_code == UNEXPECTED_STATUS
    assert len(bk.unexpected) == 1
    bk.unexpected.clear()


async def test_an_unknown_query_parameter_is_loud(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    response = await http.get(f"{PIPE}/builds", params={"states[]": "running"})

    assert response.status_code == UNEXPECTED_STATUS
    assert "unknown query parameter 'states[]'" in bk.unexpected[0]
    bk.unexpected.clear()


async def test_an_unknown_body_field_is_loud(bk: FakeBuildkite, http: httpx.AsyncClient) -> None:
    body = {"commit": "HEAD", "branch": "main", "metadata": {}}

    response = await http.post(f"{PIPE}/builds", json=body)

    assert response.status_code == UNEXPECTED_STATUS
    assert "unknown body fields ['metadata']" in bk.unexpected[0]
    assert bk.builds == []
    bk.unexpected.clear()


async def test_authentication_is_required(bk: FakeBuildkite) -> None:
    async with httpx.AsyncClient(base_url=bk.url) as anonymous:
        missing = await anonymous.get("/user")
        wrong = await anonymous.get("/user", headers={"Authorization": "Bearer nope"})

    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json() == {"message": UNAUTHORIZED_MESSAGE}


async def test_every_answer_has_rate_limit_headers(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    bk.user_rate_limit = 50
    for response in (await http.get("/user"), await http.get(f"{PIPE}/builds/99")):
        assert response.headers["RateLimit-Limit"] == "200"
        assert response.headers["RateLimit-Scope"] == "organization"  # as a real answer reads
        assert int(response.headers["RateLimit-Reset"]) <= 60
        assert response.headers["RateLimit-User-Limit"] == "50"
        assert int(response.headers["RateLimit-User-Reset"]) <= 60
    assert response.headers["RateLimit-Remaining"] == "198"
    assert response.headers["RateLimit-User-Remaining"] == "48"


async def test_a_429_names_the_scope_it_exceeded(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    bk.user_rate_limit = 1
    assert (await http.get("/user")).status_code == 200
    user = await http.get("/user")
    assert user.status_code == 429
    assert user.json()["scope"] == "rest_user" and user.json()["limit"] == 1
    assert user.headers["RateLimit-User-Remaining"] == "0"
    bk.rate_limit_next(1, reset=9)
    org = await http.get("/user")
    assert (org.json()["scope"], org.json()["reset"]) == ("rest", 9)
    assert org.headers["RateLimit-Remaining"] == "0"


async def test_a_clustered_organization_needs_a_cluster_id_to_create_a_pipeline(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    body = {"name": "web", "repository": "git@x:y.git", "configuration": "steps: []"}
    assert (await http.post(f"{ORG}/pipelines", json=body)).status_code == 201
    cluster = bk.add_cluster()
    (listed,) = (await http.get(f"{ORG}/clusters")).json()
    assert listed["id"] == cluster["id"] and listed["name"] == "Default cluster"
    body["name"] = "api"
    refused = await http.post(f"{ORG}/pipelines", json=body)
    assert refused.status_code == 422
    assert refused.json()["errors"] == [{"field": "cluster_id", "code": "missing"}]
    created = await http.post(f"{ORG}/pipelines", json={**body, "cluster_id": cluster["id"]})
    assert created.json()["cluster_id"] == cluster["id"]


async def test_manual_jobs_carry_no_fields_as_on_buildkite(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    fields = [{"text": "Notes", "key": "notes"}]
    bk.add_pipeline("forms", block="Approve", block_fields=fields, block_key="approve")
    bk.add_build("forms", blocked=True)
    build = (await http.get(f"{ORG}/pipelines/forms/builds/1")).json()
    (manual,) = [job for job in build["jobs"] if job["type"] == "manual"]
    # The recorded shape of a real manual job, and nothing else.
    assert set(manual) == {
        "id",
        "graphql_id",
        "type",
        "label",
        "state",
        "step_key",
        "web_url",
        "created_at",
        "unblock_url",
        "unblockable",
        "unblocked_by",
        "unblocked_at",
    }
    assert (manual["state"], manual["step_key"], manual["unblockable"]) == (
        "blocked",
        "approve",
        True,
    )
    assert manual["web_url"] is None
    # The fields are in the pipeline's YAML, and Buildkite checks them when unblocking.
    pipeline = (await http.get(f"{ORG}/pipelines/forms")).json()
    assert "key: notes" in pipeline["configuration"]
    unblock = f"{ORG}/pipelines/forms/builds/1/jobs/{manual['id']}/unblock"
    refused = await http.put(unblock, json={"fields": {}})
    assert refused.status_code == 422
    assert refused.json() == {
        "message": "Validation Failed",
        "errors": [{"field": "notes", "code": "missing"}],
    }
    assert (await http.put(unblock, json={"fields": {"notes": "ok"}})).status_code == 200


async def test_a_build_waiting_on_a_block_step_keeps_its_state(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    bk.add_build("deploy-prod", state="blocked")
    build = (await http.get(f"{PIPE}/builds/1")).json()
    assert (build["state"], build["blocked"]) == ("passed", True)


async def test_link_header_has_next_last_first_and_prev(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    for _ in range(5):
        bk.add_build("deploy-prod")

    response = await http.get(
        f"{PIPE}/builds", params={"per_page": "2", "page": "2", "state[]": "scheduled"}
    )

    assert [build["number"] for build in response.json()] == [3, 2]
    links = {rel: link["url"] for rel, link in response.links.items()}
    base = f"{bk.url}{PIPE}/builds?per_page=2&state%5B%5D=scheduled"
    assert links == {
        "next": f"{base}&page=3",
        "last": f"{base}&page=3",
        "first": f"{base}&page=1",
        "prev": f"{base}&page=1",
    }


async def test_create_build_validation(bk: FakeBuildkite, http: httpx.AsyncClient) -> None:
    missing = await http.post(f"{PIPE}/builds", json={"message": "no commit"})
    unknown = await http.post("/organizations/acme/pipelines/nope/builds", json={})

    assert missing.status_code == 422
    assert missing.json() == {
        "message": "Validation Failed",
        "errors": [{"field": "commit", "code": "missing"}, {"field": "branch", "code": "missing"}],
    }
    assert (unknown.status_code, unknown.json()) == (404, {"message": "Not Found"})


async def test_a_build_moves_through_its_states(bk: FakeBuildkite) -> None:
    bk.add_pipeline("release", block="Ship it?")
    build = bk.add_build("release")
    test, block, deploy = build["jobs"]
    assert [job["state"] for job in build["jobs"]] == ["scheduled", "waiting", "waiting"]

    running = bk.set_build_state("release", 1, "running")
    assert running["started_at"] and running["finished_at"] is None
    assert [job["state"] for job in running["jobs"]] == ["running", "waiting", "waiting"]

    blocked = bk.set_build_state("release", 1, "passed", blocked=True)
    assert (blocked["state"], blocked["blocked"]) == ("passed", True)
    assert blocked["finished_at"] is not None
    assert [job["state"] for job in blocked["jobs"]] == ["passed", "blocked", "waiting"]
    assert bk.webhook_payload("release", 1)["event"] == "build.finished"

    failed = bk.set_build_state("release", 1, "failed", failed_jobs=["Test"])
    assert failed["jobs"][0]["exit_status"] == 1 and failed["jobs"][0]["state"] == "failed"
    assert bk.webhook_payload("release", 1)["event"] == "build.finished"
    assert test["id"] and block["id"] and deploy["id"]

    with pytest.raises(ValueError, match="no jobs named"):
        bk.set_build_state("release", 1, "failed", failed_jobs=["Nope"])
    with pytest.raises(ValueError, match="unknown build state"):
        bk.set_build_state("release", 1, "exploded")


async def test_the_finished_filter_matches_buildkite(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    for state in ("scheduled", "running", "passed", "failed", "canceled", "skipped"):
        bk.add_build("deploy-prod", state=state)
    bk.add_build("deploy-prod", state="passed", blocked=True)

    response = await http.get(f"{PIPE}/builds", params={"state": "finished"})

    assert sorted(build["state"] for build in response.json()) == [
        "canceled",
        "failed",
        "passed",
        "passed",
    ]


async def test_retried_jobs_are_hidden_unless_asked_for(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    bk.add_build("deploy-prod", state="failed", failed_jobs=["Test"])
    assert (await http.put(f"{PIPE}/builds/1/retry_failed_jobs")).status_code == 202

    shown = (await http.get(f"{PIPE}/builds/1")).json()["jobs"]
    everything = (
        await http.get(f"{PIPE}/builds/1", params={"include_retried_jobs": "true"})
    ).json()

    assert [job["state"] for job in shown] == ["scheduled", "passed"]
    assert [job["state"] for job in everything["jobs"]] == ["failed", "scheduled", "passed"]


async def test_a_job_log_without_text_plain_is_json(
    bk: FakeBuildkite, http: httpx.AsyncClient
) -> None:
    job_id = bk.add_build("deploy-prod")["jobs"][0]["id"]
    bk.set_job_log(job_id, "hello\n")

    response = await http.get(f"{PIPE}/builds/1/jobs/{job_id}/log")

    assert response.json()["content"] == "hello\n"
    assert response.json()["size"] == 6


async def test_latency_and_requests_to(bk: FakeBuildkite, http: httpx.AsyncClient) -> None:
    bk.latency = 0.01
    await http.get("/user")
    await http.get(f"{PIPE}")

    assert [r.path for r in bk.requests_to("GET", "/organizations/acme")] == [f"/v2{PIPE}"]
    assert [r.path for r in bk.requests_to("GET", "/v2/user")] == ["/v2/user"]
    assert bk.last_request.api_path == PIPE
