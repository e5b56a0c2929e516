"""`python -m app --check-config`: one line per check, ✓ or ✗, exit 0 or 1, never a secret."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.ops.checks import check_config, report
from app.ops.logs import RedactSecrets, secrets_of
from app.simulators.bot import bot_logging, bot_settings
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

ROOT = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**values: str) -> dict[str, str]:
    """The environment of a child `python -m app`, without the developer's own settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "BUILDKITE_", "REDIS_", "PORT", "LOG_LEVEL", "POLICY_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(values)
    return env


def main_in_process(
    env: dict[str, str],
    *args: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> subprocess.CompletedProcess[str]:
    """What `python -m app` (`sys.exit(main())`) does in the environment `env`, run in this
    process: for runs that stop before the bot serves, without the second of CPU that a new
    interpreter costs. The environment and the logging set-up are put back afterwards."""
    from app.__main__ import main

    with monkeypatch.context() as patch, bot_logging():
        for name in [n for n in os.environ if n not in env]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "app", *args], code, out, err)


async def test_every_check_passes_against_working_services(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text("pipelines:\n  deploy-prod:\n    deployers: [U0USER]\n")
    settings = bot_settings(slack, bk, redis_url, policy_file=str(policy))
    text, ok = report(await check_config(settings), RedactSecrets(secrets_of(settings)).redact)
    lines = text.splitlines()
    assert ok, text
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "✓ settings",
        "✓ policy",
        "✓ slack",
        "✓ buildkite",
        "✓ redis",
    ]
    assert "1 pipeline rules" in lines[1]
    assert "@chatops" in lines[2]
    assert "read_builds, write_builds, read_pipelines" in lines[3]
    assert lines[-1] == "All 5 checks passed."


async def test_each_problem_is_named_on_its_own_line(
    slack: FakeSlack, bk: FakeBuildkite, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text("default: {}\nadmins: [not-a-user]\n")
    bk.scopes.remove("write_builds")
    settings = bot_settings(
        slack,
        bk,
        f"redis://:pw-test-only@127.0.0.1:{closed_port()}/0",
        policy_file=str(policy),
        slack_bot_token="xoxb-revoked",
        slack_app_token=slack.app_token,
    )
    text, ok = report(await check_config(settings), RedactSecrets(secrets_of(settings)).redact)
    assert not ok
    lines = dict(line.split(": ", 1) for line in text.splitlines()[:-1])
    assert lines["✓ settings"].startswith("valid (Socket Mode")
    assert "line 2: admins" in lines["✗ policy"]
    assert lines["✗ slack"] == (
        "auth.test failed with invalid_auth: SLACK_BOT_TOKEN is not a valid token"
    )
    assert lines["✓ slack app token"] == "Socket Mode connections can be opened"
    assert "lacks the write_builds scope" in lines["✗ buildkite"]
    assert lines["✗ redis"].startswith("PING failed (redis://:***@127.0.0.1:")
    assert text.splitlines()[-1] == "4 of 6 checks failed."
    for secret in secrets_of(settings):
        assert secret not in text


async def test_webhooks_left_off_are_said_so(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str
) -> None:
    settings = bot_settings(slack, bk, redis_url, buildkite_webhook_token=None)
    checks = {c.name: c for c in await check_config(settings)}
    assert checks["settings"].ok
    assert checks["settings"].detail.endswith(
        "; BUILDKITE_WEBHOOK_TOKEN not set: every webhook is refused (401), builds are followed "
        "by polling"
    )
    with_token = {c.name: c for c in await check_config(bot_settings(slack, bk, redis_url))}
    assert "BUILDKITE_WEBHOOK_TOKEN" not in with_token["settings"].detail


async def test_an_unknown_organization_is_named(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str
) -> None:
    settings = bot_settings(slack, bk, redis_url, buildkite_org="not-acme")
    checks = {c.name: c for c in await check_config(settings)}
    assert not checks["buildkite"].ok
    assert "organization `not-acme` not found" in checks["buildkite"].detail
    bk.unexpected.clear()  # the fake reports the unknown org as unexpected; here it is the point


async def test_the_command_line_prints_the_report_and_exits_0(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    env = child_env(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET="sign-secret-value",
        SLACK_API_URL=slack.api_url,
        BUILDKITE_API_TOKEN=bk.token,
        BUILDKITE_API_URL=bk.url,
        BUILDKITE_ORG=bk.org,
        REDIS_URL=redis_url,
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "--check-config",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, (out, err)
    text = out.decode()
    assert text.splitlines()[-1] == "All 5 checks passed."
    assert "✓ policy: no file at policy.yml" in text
    assert err == b""
    for secret in (slack.bot_token, "sign-secret-value", bk.token):
        assert secret not in text


def test_bad_settings_fail_the_check_without_showing_them(tmp_path: Path) -> None:
    env = child_env(SLACK_BOT_TOKEN="xoxp-fake1", BUILDKITE_ORG="acme")
    result = subprocess.run(
        [sys.executable, "-m", "app", "--check-config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "✗ settings: BUILDKITE_API_TOKEN is not set" in result.stdout
    assert "✗ settings: SLACK_BOT_TOKEN is invalid" in result.stdout
    assert "xoxp-fake1" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


async def test_the_policy_check_names_each_bad_env_rule(
    slack: FakeSlack, bk: FakeBuildkite, tmp_path: Path
) -> None:
    from app.ops.checks import check_policy

    policy = tmp_path / "policy.yml"
    policy.write_text("default:\n  env:\n    deny: [LD_*, 'a b']\n    allows: []\n")
    check = check_policy(bot_settings(slack, bk, "redis://127.0.0.1:1/0", policy_file=str(policy)))
    assert not check.ok
    problems = check.detail.splitlines()
    assert len(problems) == 2
    assert "line 3: default.env.deny" in problems[0] and "'a b'" in problems[0]
    assert "line 4: default.env.allows: Extra inputs are not permitted" in problems[1]


async def test_two_policy_problems_are_two_lines_of_the_report(
    slack: FakeSlack, bk: FakeBuildkite, tmp_path: Path
) -> None:
    from app.ops.checks import check_policy

    policy = tmp_path / "policy.yml"
    policy.write_text("admins: 5\ndefault: 7\n")
    check = check_policy(bot_settings(slack, bk, "redis://127.0.0.1:1/0", policy_file=str(policy)))
    text, ok = report([check], str)
    assert not ok
    assert text.splitlines() == [
        f"✗ policy: {policy}, line 1: admins: Input should be a valid list",
        f"✗ policy: {policy}, line 2: default: Input should be a valid dictionary or instance "
        "of Rule",
        "1 of 1 checks failed.",
    ]


def test_the_policy_is_checked_even_without_the_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """deploy/README.md checks a policy before it reaches the cluster, where the tokens are not
    set: the policy's own problems are named beside the missing settings."""
    policy = tmp_path / "policy.yml"
    policy.write_text("pipelines:\n  deploy-prod:\n    deployer: [U1234]\n")
    result = main_in_process(
        child_env(POLICY_FILE=str(policy)), "--check-config", monkeypatch=monkeypatch, capsys=capsys
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "✗ settings: SLACK_BOT_TOKEN is not set" in lines
    assert [line for line in lines if line.startswith("✗ policy: ")] == [
        f"✗ policy: {policy}, line 3: pipelines.deploy-prod.deployer: Extra inputs are not "
        "permitted"
    ]
    policy.write_text("pipelines:\n  deploy-prod:\n    deployers: [U1234]\n")
    result = main_in_process(
        child_env(POLICY_FILE=str(policy)), "--check-config", monkeypatch=monkeypatch, capsys=capsys
    )
    assert f"✓ policy: {policy}: 1 pipeline rules" in result.stdout.splitlines()
