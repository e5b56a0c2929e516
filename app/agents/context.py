"""What a tool call runs with: the agent, the services, the changes its waits wake on, and
the call's identity; and the refusals a tool decides itself."""

from __future__ import annotations

from dataclasses import dataclass

from app.agents.identity import Agent
from app.agents.waiting import Changes
from app.core.services import Services


class Refused(Exception):
    """A refusal the tool itself decides (not the core's): a plain sentence."""


@dataclass(frozen=True)
class Context:
    """What a tool call runs with."""

    agent: Agent
    services: Services
    changes: Changes
    #: The call's identity, the core's request claims are derived from (retries share it).
    trigger: str

    def channel_for(self, pipeline: str) -> str:
        """Where this agent acts on `pipeline`, or a refusal saying how to give it one."""
        channel = self.services.policy.agent_channel(self.agent.name, pipeline)
        if channel is None:
            raise Refused(
                f"Agent {self.agent.name} has no channel for {pipeline}: give it `channel:` "
                "(a channel id) in the policy's agents, or give the pipeline's rule a channel id "
                "first in `channels:`. Its build messages and approval requests are posted there."
            )
        return channel
