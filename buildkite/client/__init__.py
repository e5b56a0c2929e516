"""Async client for Buildkite's REST API v2: one method per endpoint, pydantic models out.

Retries, rate-limit waits (``transport``) and pagination (``pagination``) live here so callers
never see them, and a request that starts a build is never blindly sent twice (``starts``).
The endpoints are grouped by resource (``builds``, ``pipelines``, ``agents``,
``organization``) and composed into ``BuildkiteClient``; every public name is importable from
here.
"""

from buildkite.client.agents import AgentsAPI
from buildkite.client.base import DEFAULT_BASE_URL
from buildkite.client.builds import (
    REQUEST_ID_META_KEY,
    SOURCE_META_KEY,
    SOURCE_META_VALUE,
    BuildsAPI,
)
from buildkite.client.organization import OrganizationAPI
from buildkite.client.pagination import MAX_PER_PAGE
from buildkite.client.pipelines import PipelinesAPI
from buildkite.client.rate_limits import ORGANIZATION_SCOPE, USER_SCOPE, RateLimitBudget
from buildkite.client.starts import StartLookup
from buildkite.client.transport import DEFAULT_MAX_CONCURRENT_REQUESTS, USER_AGENT

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "MAX_PER_PAGE",
    "ORGANIZATION_SCOPE",
    "REQUEST_ID_META_KEY",
    "SOURCE_META_KEY",
    "SOURCE_META_VALUE",
    "USER_AGENT",
    "USER_SCOPE",
    "BuildkiteClient",
    "RateLimitBudget",
    "StartLookup",
]


class BuildkiteClient(BuildsAPI, PipelinesAPI, AgentsAPI, OrganizationAPI):
    """Buildkite REST API v2 for one organization, over one shared ``httpx.AsyncClient``.

    Docs: https://buildkite.com/docs/apis/rest-api
    """
