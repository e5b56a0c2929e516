"""The agents and clusters endpoints: list, get and stop agents; list clusters (cached)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from buildkite.client.base import ClientBase
from buildkite.client.pagination import MAX_PER_PAGE, paginate
from buildkite.models import Agent, Cluster

__all__ = ["AgentsAPI"]

_CLUSTERS_TTL = 300.0


class AgentsAPI(ClientBase):
    """The organization's agents and clusters."""

    _clusters: tuple[float, list[Cluster]] | None = None

    # Agents

    def list_agents(
        self,
        *,
        name: str | None = None,
        hostname: str | None = None,
        version: str | None = None,
        per_page: int = MAX_PER_PAGE,
        limit: int | None = None,
    ) -> AsyncIterator[Agent]:
        """Iterate over the organization's connected agents, optionally filtered.

        https://buildkite.com/docs/apis/rest-api/agents#list-agents
        """
        filters = {"name": name, "hostname": hostname, "version": version}
        params = [(key, value) for key, value in filters.items() if value is not None]
        path = f"{self._org_path}/agents"
        return paginate(self._transport, path, params, Agent, per_page=per_page, limit=limit)

    async def get_agent(self, agent_id: str) -> Agent:
        """Get one agent.

        https://buildkite.com/docs/apis/rest-api/agents#get-an-agent
        """
        return await self._transport.get(self._agent_path(agent_id), Agent)

    async def stop_agent(self, agent_id: str, *, force: bool = False) -> None:
        """Stop an agent; graceful by default (Buildkite's own default cancels the running job).

        https://buildkite.com/docs/apis/rest-api/agents#stop-an-agent
        """
        path = f"{self._agent_path(agent_id)}/stop"
        await self._transport.request("PUT", path, json={"force": force})

    # Clusters

    async def list_clusters(self) -> list[Cluster]:
        """The organization's clusters (empty when it uses none); cached for a few minutes,
        as clusters change rarely and pipeline creation asks each time.

        https://buildkite.com/docs/apis/rest-api/clusters#clusters-list-clusters
        """
        now = time.monotonic()
        if self._clusters is not None and now - self._clusters[0] < _CLUSTERS_TTL:
            return list(self._clusters[1])
        path = f"{self._org_path}/clusters"
        clusters = [
            cluster
            async for cluster in paginate(
                self._transport, path, [], Cluster, per_page=MAX_PER_PAGE, limit=None
            )
        ]
        self._clusters = (now, clusters)
        return list(clusters)
