"""Who an agent is: the policy's `agents:` entries, found by the sha256 of a bearer token.

The bot never keeps an agent's token, only its digest; comparing digests with
`hmac.compare_digest` against every entry keeps the time taken independent of which (if any)
matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from app.core.policy import AGENT_PREFIX, AgentBudget, AgentSpec, Policy
from app.slack.actor import Actor

#: A bearer token longer than this is no token of ours (and is not hashed).
MAX_TOKEN = 4096
#: What a token is made of: visible ASCII (a header's other bytes are no token of ours, and
#: would not even encode).
_TOKEN = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Agent:
    """An authenticated agent: its name, the person it acts for, and its budget."""

    name: str
    acts_for: str | None
    budget: AgentBudget

    @property
    def user_id(self) -> str:
        """How the core, the audit trail and locks know it: never a Slack user id."""
        return AGENT_PREFIX + self.name

    def actor(self, channel: str) -> Actor:
        """The agent as the core's requester, acting in `channel`."""
        return Actor(user_id=self.user_id, user_name=f"agent {self.name}", channel_id=channel)


def token_digest(token: str) -> str:
    """The sha256 hex of a token, as the policy's `token_sha256` holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN:
        return None
    return token if _TOKEN.fullmatch(token) else None


class Identities:
    """The policy's agents, looked up by token."""

    def __init__(self, policy: Policy) -> None:
        self._agents: Mapping[str, AgentSpec] = policy.data.agents

    @property
    def declared(self) -> bool:
        """Whether the policy declares any agent at all."""
        return bool(self._agents)

    def authenticate(self, token: str | None) -> Agent | None:
        """The agent whose token this is, or None (a missing, unknown or malformed token)."""
        if token is None or len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token):
            return None
        digest = token_digest(token).encode()
        found: Agent | None = None
        for name, spec in self._agents.items():  # every entry, whichever matches
            if hmac.compare_digest(digest, spec.token_sha256.encode()):
                found = Agent(name=name, acts_for=spec.acts_for, budget=spec.budget)
        return found
