"""Agents in the policy file: their entries, `agent:<name>` in rules, problems named by line,
denied by default, bounded by their person, never approvers; and the docs' example loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.agents.identity import Identities, bearer_token, token_digest
from app.core.policy import Action, PolicyError, load_policy

DIGEST = hashlib.sha256(b"the-token").hexdigest()

POLICY = f"""\
admins: [U0ADMIN]
agents:
  release-captain:
    token_sha256: "{DIGEST}"
    acts_for: U0LEAD
  watcher:
    token_sha256: "{"b" * 64}"
default:
  deployers: [U0LEAD, "agent:release-captain"]
pipelines:
  open-to-all: {{}}
  lead-cannot:
    deployers: [U0OTHER, "agent:release-captain"]
  channelled:
    channels: [C0DEPLOYS, "#ops"]
    deployers: [U0LEAD, "agent:release-captain"]
"""


async def no_groups(group: str) -> list[str]:
    return []


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yml"
    path.write_text(text)
    return path


async def test_agents_are_denied_unless_a_rule_grants_them_by_name(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY))

    async def allowed(user: str, pipeline: str, channel: str = "C0DEPLOYS") -> bool:
        decision = await policy.check(
            Action.DEPLOY,
            pipeline,
            user=user,
            channel_id=channel,
            channel_name=None,
            resolve=no_groups,
        )
        return decision.allowed

    assert await allowed("agent:release-captain", "anything")
    assert not await allowed("agent:watcher", "anything")  # not granted
    # "Everyone" (a list left out) means every person, never an agent.
    assert await allowed("U0SOMEONE", "open-to-all")
    assert not await allowed("agent:release-captain", "open-to-all")
    # Granted, but its person may not: never more than the human.
    assert not await allowed("agent:release-captain", "lead-cannot")
    assert await allowed("agent:release-captain", "channelled", "C0DEPLOYS")
    assert not await allowed("agent:release-captain", "channelled", "C0ELSEWHERE")
    assert not await allowed("agent:unknown", "anything")
    assert not await policy.is_admin("agent:release-captain", no_groups)
    assert policy.agent_channel("release-captain", "channelled") == "C0DEPLOYS"
    assert policy.agent_channel("release-captain", "anything") is None
    decision = await policy.check(
        Action.DEPLOY,
        "lead-cannot",
        user="agent:release-captain",
        channel_id="C0X",
        channel_name=None,
        resolve=no_groups,
    )
    assert "acts for <@U0LEAD>, who may not deploy `lead-cannot`" in decision.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f'agents:\n  a:\n    token_sha256: "{DIGEST}"\n'
            'default:\n  deployers: [U0X, "agent:nobody"]\n',
            "line 5: default.deployers.1: 'agent:nobody' is not declared under `agents:`",
        ),
        (
            "agents:\n  a:\n    token_sha256: the-token\n",
            "line 3: agents.a.token_sha256: token_sha256 must be the 64 hex characters",
        ),
        (
            f'agents:\n  a:\n    token_sha256: "{DIGEST}"\n    acts_for: alice\n',
            "line 4: agents.a.acts_for: 'alice' is not a Slack user id",
        ),
        (
            f'agents:\n  a:\n    token_sha256: "{DIGEST}"\n    channel: "#ops"\n',
            "line 4: agents.a.channel: '#ops' is not a channel id",
        ),
        (
            f'agents:\n  a:\n    token_sha256: "{DIGEST}"\n    budget: {{reads_per_minute: -1}}\n',
            "line 4: agents.a.budget.reads_per_minute",
        ),
        (
            'pipelines:\n  web:\n    approval:\n      approvers: ["agent:a"]\n',
            "line 4: pipelines.web.approval.approvers: 'agent:a' is an agent: only people",
        ),
        ('admins: ["agent:a"]\n', "admins: 'agent:a' is an agent: only people may be named here"),
        (
            f'agents:\n  A B:\n    token_sha256: "{DIGEST}"\n',
            "agents: 'A B' is not an agent's name",
        ),
        (
            f'agents:\n  a:\n    token_sha256: "{DIGEST}"\n  b:\n    token_sha256: "{DIGEST}"\n',
            "two agents have the same token_sha256",
        ),
    ],
)
def test_agent_problems_are_named_by_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, text))
    assert expected in str(caught.value)
    assert str(tmp_path / "policy.yml") in str(caught.value)
    assert "the-token\n" not in str(caught.value).replace(DIGEST, "")


def test_a_token_is_found_by_its_digest_only(tmp_path: Path) -> None:
    identities = Identities(load_policy(write(tmp_path, POLICY)))
    agent = identities.authenticate("the-token")
    assert agent is not None and agent.name == "release-captain" and agent.acts_for == "U0LEAD"
    assert agent.user_id == "agent:release-captain"
    assert agent.budget.mutations_per_hour == 20 and agent.budget.reads_per_minute == 60
    assert identities.authenticate("the-token ") is None
    assert identities.authenticate(DIGEST) is None  # the digest is no token
    assert identities.authenticate(None) is None
    assert identities.authenticate("x" * 10_000) is None
    assert token_digest("the-token") == DIGEST
    assert bearer_token("Bearer the-token") == "the-token"
    assert bearer_token("bearer  the-token ") == "the-token"
    assert bearer_token("Basic the-token") is None
    assert bearer_token("Bearer") is None and bearer_token(None) is None


def test_the_docs_example_policy_is_valid(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "agents.md").read_text()
    example = docs.split("```yaml\n# policy.yml\n", 1)[1].split("```", 1)[0]
    policy = load_policy(write(tmp_path, example))
    assert policy.data.agents
