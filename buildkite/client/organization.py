"""The organization, current user and access token endpoints, which a health check reads."""

from __future__ import annotations

from buildkite.client.base import ClientBase
from buildkite.models import AccessToken, Organization, User

__all__ = ["OrganizationAPI"]


class OrganizationAPI(ClientBase):
    """The organization itself, and the user and token the client calls as."""

    async def get_organization(self) -> Organization:
        """Get the client's organization.

        https://buildkite.com/docs/apis/rest-api/organizations#get-an-organization
        """
        return await self._transport.get(self._org_path, Organization)

    async def get_user(self) -> User:
        """Get the user who owns the API token.

        https://buildkite.com/docs/apis/rest-api/user#get-the-current-user
        """
        return await self._transport.get("/user", User)

    async def get_access_token(self) -> AccessToken:
        """Describe the API token in use, including its scopes.

        https://buildkite.com/docs/apis/rest-api/access-token#get-the-current-token
        """
        return await self._transport.get("/access-token", AccessToken)
