"""The fake Buildkite's agents, which the sandbox's jobs run on: no more lenient than Buildkite
(docs pages/apis/rest_api/agents.md: only connected agents are listed, and only they can be
stopped; a force stop, the default, cancels the agent's job and build)."""

from __future__ import annotations

from typing import Any

import httpx

from app.simulators.buildkite import FakeBuildkite


def api(bk: FakeBuildkite) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"{bk.url}/organizations/{bk.org}",
        headers={"Authorization": f"Bearer {bk.token}"},
    )


async def stop(bk: FakeBuildkite, agent: dict[str, Any], **body: Any) -> httpx.Response:
    async with api(bk) as http:
        return await http.put(f"/agents/{agent['id']}/stop", json=body)


async def listed(bk: FakeBuildkite) -> list[str]:
    async with api(bk) as http:
        return [a["name"] for a in (await http.get("/agents")).json()]


async def test_running_jobs_take_idle_agents_and_free_them_when_done(bk: FakeBuildkite) -> None:
    bk.add_pipeline("web")
    one, two, three = (bk.add_agent(f"builder-{n}") for n in (1, 2, 3))
    build = bk.add_build("web")
    bk.set_build_state("web", build["number"], "running")
    test, deploy = build["jobs"]
    assert (test["agent"]["name"], deploy["agent"]["name"]) == ("builder-1", "builder-2")
    assert one["job"] is test and two["job"] is deploy and three["job"] is None
    assert [a["name"] for a in bk.idle_agents()] == ["builder-3"]
    async with api(bk) as http:
        shown = (await http.get(f"/agents/{one['id']}")).json()
    assert shown["job"]["state"] == "running" and shown["job"]["name"] == "Test"

    bk.set_build_state("web", build["number"], "passed")
    assert one["job"] is None and two["job"] is None
    assert one["last_job_finished_at"] is not None
    assert test["agent"]["name"] == "builder-1"  # the job still says where it ran


async def test_a_graceful_stop_waits_for_the_job_and_only_connected_agents_stop(
    bk: FakeBuildkite,
) -> None:
    bk.add_pipeline("web")
    busy = bk.add_agent("builder-1")
    bk.add_agent("builder-2")
    build = bk.add_build("web")
    bk.set_build_state("web", build["number"], "running")

    response = await stop(bk, busy, force=False)
    assert response.status_code == 204
    assert busy["connection_state"] == "stopping"
    assert bk.build("web", build["number"])["state"] == "running"  # its job goes on
    assert "builder-1" in await listed(bk)

    refused = await stop(bk, busy, force=True)
    assert refused.status_code == 400
    assert refused.json() == {"message": "Can only stop connected agents"}

    bk.set_build_state("web", build["number"], "passed")
    assert busy["connection_state"] == "stopped" and busy["job"] is None
    assert busy["stopped_at"] is not None
    assert await listed(bk) == ["builder-2"]
    assert (await stop(bk, busy)).status_code == 400


async def test_a_force_stop_cancels_the_job_and_its_build(bk: FakeBuildkite) -> None:
    bk.add_pipeline("web")
    agent = bk.add_agent("builder-1")
    build = bk.add_build("web")
    bk.set_build_state("web", build["number"], "running")

    assert (await stop(bk, agent)).status_code == 204  # force is Buildkite's default
    live = bk.build("web", build["number"])
    assert live["state"] == "canceled" and live["finished_at"] is not None
    assert {job["state"] for job in live["jobs"]} == {"canceled"}
    assert agent["connection_state"] == "stopped" and agent["job"] is None
    assert await listed(bk) == []


async def test_an_idle_agent_stops_at_once_and_takes_no_job(bk: FakeBuildkite) -> None:
    bk.add_pipeline("web")
    agent = bk.add_agent("builder-1")
    assert (await stop(bk, agent, force=False)).status_code == 204
    assert agent["connection_state"] == "stopped"
    build = bk.add_build("web")
    bk.set_build_state("web", build["number"], "running")
    assert agent["job"] is None and build["jobs"][0]["agent"] is None
    assert bk.idle_agents() == []
