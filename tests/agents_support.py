"""What the agents' tests share: a policy with agents, a bot running it, and the SDK's own
client (ClientSession over Streamable HTTP) speaking to the bot's /mcp with a bearer token."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp import ClientSession

from app.simulators import agent_client as client
from app.simulators.bot import BotClient
from app.simulators.buildkite import FakeBuildkite

CHANNEL = "C0CHAN"
ALICE, BOB, CAROL = "U0USER", "U0BOB", "U0CAROL"
CAPTAIN_TOKEN = "mcp-captain-token-7f3a9c"
INTRUDER_TOKEN = "mcp-intruder-token-1b2c3d"
THRIFTY_TOKEN = "mcp-thrifty-token-9e8d7c"
#: Every agent token a test bot knows: none may appear in a log, result or Slack message.
AGENT_TOKENS = (CAPTAIN_TOKEN, INTRUDER_TOKEN, THRIFTY_TOKEN)
BUILDS = "/organizations/acme/pipelines/{}/builds"


sha = client.token_sha256
call = client.call
structured = client.structured


POLICY = f"""\
admins: [U0ADMIN]
agents:
  captain:
    token_sha256: "{sha(CAPTAIN_TOKEN)}"
    acts_for: U0USER
    channel: C0CHAN
    budget: {{mutations_per_hour: 6, reads_per_minute: 200}}
  intruder:
    token_sha256: "{sha(INTRUDER_TOKEN)}"
    channel: C0CHAN
  thrifty:
    token_sha256: "{sha(THRIFTY_TOKEN)}"
    channel: C0CHAN
    budget: {{mutations_per_hour: 1, reads_per_minute: 2}}
default:
  deployers: [U0USER, "agent:captain", "agent:thrifty"]
pipelines:
  deploy-prod:
    channels: [C0CHAN]
    deployers: [U0USER, U0BOB, "agent:captain"]
    protected: true
    approval:
      approvers: [U0USER, U0BOB]
  bob-only:
    deployers: [U0BOB, "agent:captain"]
"""


def write_policy(tmp_path: Path, text: str = POLICY) -> str:
    path = tmp_path / "policy.yml"
    path.write_text(text)
    return str(path)


def add_pipelines(bk: FakeBuildkite) -> None:
    for slug in ("web", "deploy-prod", "bob-only"):
        bk.add_pipeline(slug, repository=f"git@github.com:acme/{slug}.git")


@contextlib.asynccontextmanager
async def agent_session(bot: BotClient, token: str | None) -> AsyncIterator[ClientSession]:
    """The SDK's client, initialized, against the bot's /mcp with `token` as bearer."""
    async with client.agent_session(bot.base, token) as session:
        yield session


def error_text(result: types.CallToolResult) -> str:
    assert result.is_error
    return client.text_of(result)


def mutations(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]
