"""`python -m app mcp`: the MCP server over stdin and stdout, for a local client, as the agent
whose token is in BKCHATOPS_AGENT_TOKEN. `app.main.run_mcp_stdio` opens the services (the
same as the bot's, from the same settings) and hands them here."""

from __future__ import annotations

import logging

from mcp.server.stdio import stdio_server

from app.agents.gateway import Gateway
from app.agents.identity import Agent, Identities
from app.core.policy import Policy

log = logging.getLogger(__name__)

TOKEN_VARIABLE = "BKCHATOPS_AGENT_TOKEN"  # noqa: S105 - the variable's name, not a token


def agent_for(policy: Policy, token: str | None) -> Agent | None:
    """The policy's agent with this token, or None."""
    return Identities(policy).authenticate(token)


async def serve_stdio(gateway: Gateway, agent: Agent) -> None:
    """Serve `agent`'s tool calls over stdio until the client closes stdin."""
    from app.agents.server import create_server

    server = create_server(gateway, lambda ctx: agent)
    async with stdio_server() as (read, write):
        log.info("mcp: serving agent %s over stdio", agent.name)
        await server.run(read, write, server.create_initialization_options())
