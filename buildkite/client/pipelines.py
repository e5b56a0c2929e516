"""The pipelines endpoints: list, get, create, update and delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from buildkite.client.base import ClientBase, identifier
from buildkite.client.pagination import MAX_PER_PAGE, paginate
from buildkite.models import Pipeline

__all__ = ["PipelinesAPI"]


class PipelinesAPI(ClientBase):
    """The organization's pipelines."""

    def list_pipelines(
        self, *, per_page: int = MAX_PER_PAGE, limit: int | None = None
    ) -> AsyncIterator[Pipeline]:
        """Iterate over the organization's pipelines, across pages.

        https://buildkite.com/docs/apis/rest-api/pipelines#list-pipelines
        """
        path = f"{self._org_path}/pipelines"
        return paginate(self._transport, path, [], Pipeline, per_page=per_page, limit=limit)

    async def get_pipeline(self, slug: str) -> Pipeline:
        """Get one pipeline.

        https://buildkite.com/docs/apis/rest-api/pipelines#get-a-pipeline
        """
        return await self._transport.get(self._pipeline_path(slug), Pipeline)

    async def create_pipeline(
        self,
        *,
        name: str,
        repository: str,
        configuration: str,
        cluster_id: str | None = None,
        **extra: Any,
    ) -> Pipeline:
        """Create a YAML pipeline; never retried, as a retry could create it twice.

        ``cluster_id`` is required on an organization that uses clusters.

        https://buildkite.com/docs/apis/rest-api/pipelines#create-a-yaml-pipeline
        """
        body = {"name": name, "repository": repository, "configuration": configuration, **extra}
        if cluster_id is not None:
            body["cluster_id"] = identifier(cluster_id, "cluster id")
        path = f"{self._org_path}/pipelines"
        response = await self._transport.request("POST", path, json=body, retry=False)
        return self._transport.parse(response, Pipeline)

    async def update_pipeline(self, slug: str, **fields: Any) -> Pipeline:
        """Change some of a pipeline's settings.

        https://buildkite.com/docs/apis/rest-api/pipelines#update-a-pipeline
        """
        if not fields:
            raise ValueError("update_pipeline needs at least one field to change")
        response = await self._transport.request("PATCH", self._pipeline_path(slug), json=fields)
        return self._transport.parse(response, Pipeline)

    async def delete_pipeline(self, slug: str) -> None:
        """Delete a pipeline (204 No Content).

        https://buildkite.com/docs/apis/rest-api/pipelines#delete-a-pipeline
        """
        await self._transport.request("DELETE", self._pipeline_path(slug))
