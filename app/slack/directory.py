"""Who people are in Slack: names and emails for build authors, and user group members.

Both are looked up through the Web API and cached in memory for a while, since they rarely change
and Slack rate-limits these methods (usergroups.users.list is Tier 2).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from buildkite.models import Author

log = logging.getLogger(__name__)

PEOPLE_TTL = 600.0
#: A Slack user id; anything else (an agent's `agent:<name>`) is never looked up.
SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")


class Directory:
    def __init__(
        self,
        client: AsyncWebClient,
        *,
        ttl: float = PEOPLE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.ttl = ttl
        self._clock = clock
        self._authors: dict[str, tuple[float, Author | None]] = {}
        self._by_email: dict[str, tuple[float, str | None]] = {}

    async def author_for(self, user_id: str) -> Author | None:
        """The Slack user's name and email, to credit them as the build's author in Buildkite."""
        if not SLACK_USER_ID.match(user_id):
            return None  # an agent (agent:<name>): no Slack user to credit or look up
        cached = self._authors.get(user_id)
        if cached and cached[0] > self._clock():
            return cached[1]
        author = None
        try:
            response = await self.client.users_info(user=user_id)
            user = response.get("user") or {}
            profile = user.get("profile") or {}
            name = profile.get("real_name") or user.get("real_name") or user.get("name")
            email = profile.get("email")
            if name and email:
                author = Author(name=str(name), email=str(email))
            elif name:
                log.info("no email for %s (needs users:read.email); not crediting", user_id)
        except SlackApiError as exc:
            log.warning("users.info for %s failed: %s", user_id, exc.response.get("error"))
        self._authors[user_id] = (self._clock() + self.ttl, author)
        return author

    async def user_for_email(self, email: str) -> str | None:
        """The Slack user id with this email (users.lookupByEmail), to mention a build's author."""
        key = email.lower()
        cached = self._by_email.get(key)
        if cached and cached[0] > self._clock():
            return cached[1]
        user_id = None
        try:
            response = await self.client.users_lookupByEmail(email=email)
            user_id = str((response.get("user") or {}).get("id") or "") or None
        except SlackApiError as exc:
            if exc.response.get("error") != "users_not_found":
                log.warning("users.lookupByEmail failed: %s", exc.response.get("error"))
        self._by_email[key] = (self._clock() + self.ttl, user_id)
        return user_id

    async def usergroup_members(self, group_id: str) -> list[str]:
        """Members of a Slack user group (the policy caches these)."""
        response = await self.client.usergroups_users_list(usergroup=group_id)
        return [str(user) for user in response.get("users") or []]
