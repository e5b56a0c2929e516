"""The policy file: loading, line-numbered errors, rule matching and checks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.core.policy import Action, PolicyError, load_policy

POLICY = """\
admins: [U0ADMIN]
usergroup_cache_ttl: 1m
default:
  deployers: [U0USER]
pipelines:
  deploy-prod:
    channels: ["#deploys", C0OPS]
    deployers: [S0SRE]
    cancelers: [U0USER]
    protected: true
    approval:
      approvers: [S0APPROVERS]
      expires_after: 30m
  "web-*":
    deployers: [U0WEB]
  open-*: {}
"""


async def no_groups(group: str) -> list[str]:
    return {"S0SRE": ["U0SRE"], "S0APPROVERS": ["U0BOB"]}.get(group, [])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yml"
    path.write_text(text)
    return path


def test_rules_match_exact_then_glob_then_default(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY))
    assert policy.rule_for("deploy-prod").name == "deploy-prod"
    assert policy.rule_for("deploy-prod").approval.expires_after == 1800  # type: ignore[union-attr]
    assert policy.rule_for("web-frontend").name == "web-*"
    assert policy.rule_for("open-thing").deployers is None
    assert policy.rule_for("other").name == "default"
    assert policy.data.usergroup_cache_ttl == 60


async def test_checks_channels_users_groups_and_admins(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY))

    async def check(
        action: Action, user: str, channel: str = "C0OPS", name: str | None = None
    ) -> bool:
        decision = await policy.check(
            action,
            "deploy-prod",
            user=user,
            channel_id=channel,
            channel_name=name,
            resolve=no_groups,
        )
        return decision.allowed

    assert await check(Action.DEPLOY, "U0SRE")  # through the S0SRE group
    assert not await check(Action.DEPLOY, "U0USER")
    assert await check(Action.CANCEL, "U0USER")  # cancelers is its own list
    assert await check(Action.REBUILD, "U0SRE")  # rebuilders default to deployers
    assert not await check(Action.REBUILD, "U0USER")
    assert await check(Action.DEPLOY, "U0SRE", "C0OTHER", "deploys")  # by #name
    assert not await check(Action.DEPLOY, "U0SRE", "C0OTHER", "random")
    assert await check(Action.DEPLOY, "U0ADMIN", "C0OTHER", "random")  # admins may do anything


async def test_refusal_names_the_rule_and_who_may(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY))
    decision = await policy.check(
        Action.DEPLOY,
        "deploy-prod",
        user="U0USER",
        channel_id="C0OPS",
        channel_name=None,
        resolve=no_groups,
    )
    assert decision.rule == "deploy-prod"
    assert "policy rule `deploy-prod`" in decision.reason
    assert "<!subteam^S0SRE>" in decision.reason and "<@U0ADMIN>" in decision.reason
    where = await policy.check(
        Action.DEPLOY,
        "deploy-prod",
        user="U0SRE",
        channel_id="C0X",
        channel_name="x",
        resolve=no_groups,
    )
    assert "may only be driven from #deploys, <#C0OPS>" in where.reason


async def test_group_members_are_cached_and_a_failed_lookup_refuses(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY))
    calls: list[str] = []

    async def counting(group: str) -> list[str]:
        calls.append(group)
        return ["U0SRE"]

    for _ in range(3):
        assert await policy.members(["S0SRE"], counting) == {"U0SRE"}
    assert calls == ["S0SRE"]

    async def broken(group: str) -> list[str]:
        raise RuntimeError("slack is down")

    fresh = load_policy(write(tmp_path, POLICY))
    assert await fresh.members(["S0SRE"], broken) == set()


def test_missing_file_allows_everything_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    policy = load_policy(tmp_path / "absent.yml")
    assert policy.rule_for("anything").deployers is None
    assert "everyone may deploy, cancel and rebuild every pipeline" in caplog.text
    # Logged under the package's name, whichever of its modules speaks: log filters key on it.
    assert {r.name for r in caplog.records} == {"app.core.policy"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pipelines:\n  web:\n    deployers: [U0X\n", "line 4: not valid YAML"),
        (
            "pipelines:\n  web:\n    deployer: [U0X]\n",
            "line 3: pipelines.web.deployer: Extra inputs",
        ),
        ("pipelines:\n  web:\n    deployers: [alice]\n", "line 3: pipelines.web.deployers"),
        ("default:\n  channels: [deploys]\n", "line 2: default.channels"),
        (
            "pipelines:\n  web:\n    approval:\n"
            "      expires_after: soon\n      approvers: [S0A]\n",
            "line 4: pipelines.web.approval.expires_after",
        ),
        ("- just\n- a list\n", "line 1: the policy must be a mapping"),
        # Values PyYAML's safe loader cannot build: ValueErrors, not YAMLErrors.
        ("admins: []\nsince: 2021-13-01\n", "not valid YAML (ValueError)"),
        ("admins: []\nn: " + "9" * 4400 + "\n", "not valid YAML (ValueError)"),
    ],
)
def test_malformed_file_names_the_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, text))
    assert expected in str(caught.value)
    assert str(tmp_path / "policy.yml") in str(caught.value)


def test_the_documented_example_policy_is_valid(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "policy.md").read_text()
    example = page.split("```yaml\n# policy.yml\n", 1)[1].split("```", 1)[0]
    policy = load_policy(write(tmp_path, example))
    assert policy.data.pipelines


ENV_POLICY = """\
default:
  env:
    deny: ["SECRET_*"]
pipelines:
  deploy-prod:
    env:
      allow: ["APP_*", "bad pattern!"]
      alow: [X]
  web:
    env: [X]
"""


def test_env_rule_problems_are_named_one_per_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy(write(tmp_path, ENV_POLICY))
    lines = str(raised.value).splitlines()
    assert len(lines) == 3
    assert "line 7: pipelines.deploy-prod.env.allow" in lines[0]
    assert "'bad pattern!' is not an env name pattern" in lines[0]
    assert "line 8: pipelines.deploy-prod.env.alow: Extra inputs are not permitted" in lines[1]
    assert "line 10: pipelines.web.env" in lines[2]


def test_env_rules_built_in_first_then_deny_then_allow(tmp_path: Path) -> None:
    policy = load_policy(
        write(
            tmp_path,
            'default:\n  env: {deny: ["SECRET_*"]}\n'
            'pipelines:\n  app:\n    env: {allow: ["APP_*", "BUILDKITE_*"]}\n',
        )
    )
    default, app = policy.rule_for("other"), policy.rule_for("app")
    assert default.env_refusal({"MODE": "x", "Mode2": "é ok"}) is None
    assert "env deny `SECRET_*`" in (default.env_refusal({"secret_key": "x"}) or "")
    # The built-in list cannot be allowed back.
    assert "built-in rule `BUILDKITE_*`" in (app.env_refusal({"BUILDKITE_X": "1"}) or "")
    assert "env allow list has `APP_*`, `BUILDKITE_*`" in (app.env_refusal({"MODE": "1"}) or "")
    assert app.env_refusal({"APP_MODE": "1"}) is None
    assert "not a valid environment variable name" in (default.env_refusal({"1X": "1"}) or "")
    assert "(U+000A)" in (default.env_refusal({"X": "a\nb"}) or "")
    assert "(U+200B)" in (default.env_refusal({"X": "a\u200bb"}) or "")
    assert "21 environment variables" in (
        default.env_refusal({f"V{i}": "1" for i in range(21)}) or ""
    )
    assert "at most 200" in (default.env_refusal({"X": "v" * 201}) or "")
    assert "at most 64 characters" in (default.env_refusal({"X" * 65: "1"}) or "")
