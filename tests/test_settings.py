"""Start-up configuration: one clear line per bad setting, and never a secret in it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from app.settings import Settings, SettingsError, load_settings
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import free_port
from app.simulators.slack import FakeSlack
from tests.test_ops_check_config import main_in_process

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "SLACK_BOT_TOKEN": "xoxb-fake2",
    "SLACK_SIGNING_SECRET": "sign-secret-value",
    "BUILDKITE_API_TOKEN": "bk-secret-value",
    "BUILDKITE_ORG": "acme",
    "REDIS_URL": "redis://localhost:6379/0",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_cwd: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("SLACK_", "BUILDKITE_", "REDIS_", "PORT", "LOG_LEVEL", "POLL_")):
            monkeypatch.delenv(name)
    for name, value in GOOD.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_defaults(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert str(settings.slack_api_url) == "https://slack.com/api/"
    assert str(settings.buildkite_api_url) == "https://api.buildkite.com/v2"
    assert settings.port == 3000
    assert settings.log_level == "INFO"
    assert settings.socket_mode is False
    assert settings.buildkite_webhook_token is None


def test_slack_hooks_url_defaults_to_slacks_and_must_be_https(env: pytest.MonkeyPatch) -> None:
    assert load_settings().slack_hooks_url == "https://hooks.slack.com/"
    # A prefix always ends in "/", so that it pins the host.
    env.setenv("SLACK_HOOKS_URL", "https://hooks.slack.com")
    assert load_settings().slack_hooks_url == "https://hooks.slack.com/"
    env.setenv("SLACK_HOOKS_URL", "http://127.0.0.1:4000/response/")
    assert load_settings().slack_hooks_url == "http://127.0.0.1:4000/response/"
    for bad in (
        "http://hooks.slack.com/",
        "ftp://hooks.slack.com/",
        "hooks.slack.com",
        "https://user@hooks.slack.com/",
        "https://hooks.slack.com/?x=1",
        "https://hooks.slack.com:port/",
    ):
        env.setenv("SLACK_HOOKS_URL", bad)
        with pytest.raises(SettingsError) as caught:
            load_settings()
        (problem,) = caught.value.problems
        assert problem.startswith("SLACK_HOOKS_URL is invalid:"), problem


def test_app_token_turns_on_socket_mode(env: pytest.MonkeyPatch) -> None:
    env.setenv("SLACK_APP_TOKEN", "xapp-1-abc")
    assert load_settings().socket_mode is True
    env.setenv("SLACK_APP_TOKEN", "")
    assert load_settings().socket_mode is False


def test_settings_come_from_a_dotenv_file(env: pytest.MonkeyPatch, tmp_cwd: Path) -> None:
    env.delenv("BUILDKITE_ORG")
    (tmp_cwd / ".env").write_text("BUILDKITE_ORG=from-dotenv\nPORT=8080\n")
    settings = load_settings()
    assert settings.buildkite_org == "from-dotenv"
    assert settings.port == 8080


def test_each_problem_is_one_line_naming_the_variable(env: pytest.MonkeyPatch) -> None:
    env.delenv("BUILDKITE_API_TOKEN")
    env.setenv("SLACK_BOT_TOKEN", "xoxp-fake1")
    env.setenv("PORT", "99999")
    env.setenv("BUILDKITE_ORG", "not/a slug")
    env.setenv("SLACK_APP_TOKEN", "bad-app-token-secret")
    env.setenv("LOG_LEVEL", "chatty")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    problems = caught.value.problems
    assert len(problems) == 6
    joined = "\n".join(problems)
    for name in (
        "BUILDKITE_API_TOKEN is not set",
        "SLACK_BOT_TOKEN is invalid",
        "PORT is invalid",
        "BUILDKITE_ORG is invalid",
        "SLACK_APP_TOKEN is invalid",
        "LOG_LEVEL is invalid",
    ):
        assert name in joined
    assert "xoxp-fake1" not in joined
    assert "bad-app-token-secret" not in joined


def test_every_problem_starts_with_its_variable_and_reads_plainly(
    env: pytest.MonkeyPatch,
) -> None:
    """A template's bad cluster_id is PIPELINE_TEMPLATES' problem, reported beside the others."""
    env.setenv(
        "PIPELINE_TEMPLATES",
        json.dumps({"ios": {"cluster_id": "bad/id", "steps": "steps:\n  - command: x\n"}}),
    )
    env.setenv("PORT", "abc")
    env.setenv("SLACK_SIGNING_SECRET", " ")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert sorted(caught.value.problems) == [
        "PIPELINE_TEMPLATES is invalid: template 'ios': cluster_id must be a cluster id "
        "(letters, digits and -)",
        "PORT is invalid: Input should be a valid integer, unable to parse string as an integer",
        "SLACK_SIGNING_SECRET is empty",
    ]


@pytest.mark.parametrize("url", ["redis://localhost:abc/0", "redis://localhost:99999/0"])
def test_a_redis_url_with_a_bad_port_is_one_plain_line(env: pytest.MonkeyPatch, url: str) -> None:
    env.setenv("REDIS_URL", url)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    [problem] = caught.value.problems
    assert problem.startswith("REDIS_URL is invalid: the port must be a number from 1 to 65535")
    assert "Value error" not in problem


def test_every_digest_schedule_problem_is_its_own_line(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "DIGEST_SCHEDULES",
        json.dumps([{"channel": "x", "at": "25:00"}, {"channel": "C0123", "pipelines": ["a b"]}]),
    )
    with pytest.raises(SettingsError) as caught:
        load_settings()
    prefix = "DIGEST_SCHEDULES is invalid: "
    assert caught.value.problems == [
        f"{prefix}schedule 1: channel: must be a channel id such as C0123 or a name such as "
        "#deploys",
        f"{prefix}schedule 1: at: must be a time of day, UTC, as HH:MM",
        f"{prefix}schedule 2: at: Field required",
        f'{prefix}schedule 2: pipelines: must be "all", or a list of pipeline slugs such as '
        "deploy-prod",
    ]


def test_a_dotenv_file_that_is_not_utf8_is_one_line(env: pytest.MonkeyPatch, tmp_cwd: Path) -> None:
    env.delenv("SLACK_SIGNING_SECRET")
    (tmp_cwd / ".env").write_bytes(b"BUILDKITE_ORG=acme\nSLACK_SIGNING_SECRET=s\xffcret\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.problems == [".env, line 2: not UTF-8 text; save the file as UTF-8"]


def test_a_template_with_a_good_cluster_id_keeps_it_apart(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "PIPELINE_TEMPLATES",
        json.dumps({"ios": {"cluster_id": "c-1", "steps": [{"command": "x"}]}}),
    )
    settings = load_settings()
    assert settings.pipeline_template_clusters == {"ios": "c-1"}
    assert settings.pipeline_templates["ios"].startswith("steps:")


def test_tokens_are_secret(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    text = repr(settings) + str(settings.model_dump())
    for secret in ("xoxb-fake2", "sign-secret-value", "bk-secret-value"):
        assert secret not in text


def test_the_bot_refuses_to_start_with_a_clear_report(tmp_cwd: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "BUILDKITE_", "REDIS_"))
    }
    env.update(GOOD)
    env["SLACK_SIGNING_SECRET"] = "  "
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        env=env,
        cwd=tmp_cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SLACK_SIGNING_SECRET is empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert "bk-secret-value" not in result.stderr


BAD_POLICIES: list[tuple[str | bytes | None, str]] = [
    (
        "pipelines:\n  web:\n    deployer: [U1]\n",
        "policy.yml, line 3: pipelines.web.deployer: Extra inputs are not permitted",
    ),
    ("pipelines: [\n", "policy.yml, line 2: not valid YAML"),
    (
        'pipelines:\n  web:\n    env:\n      allow: ["bad pattern!"]\n',
        "policy.yml, line 4: pipelines.web.env.allow: 'bad pattern!' is not an env name",
    ),
    (b"admins: [\xff]\n", "cannot read policy.yml: not UTF-8 text"),
    ("admins: 5\ndefault: 7\n", "policy.yml, line 2: default: Input should be a valid dictionary"),
    (None, "cannot read policy.yml: Is a directory"),
]


@pytest.mark.parametrize(("policy", "expected"), BAD_POLICIES)
def test_a_bad_policy_file_stops_start_up_with_one_line_per_problem(
    tmp_cwd: Path,
    policy: str | bytes | None,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if policy is None:
        (tmp_cwd / "policy.yml").mkdir()
    elif isinstance(policy, bytes):
        (tmp_cwd / "policy.yml").write_bytes(policy)
    else:
        (tmp_cwd / "policy.yml").write_text(policy)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "BUILDKITE_", "REDIS_", "POLICY_"))
    }
    env.update(GOOD, PYTHONPATH=str(ROOT))
    if policy == BAD_POLICIES[0][0]:  # one as a real process: its exit code and its stderr
        result = subprocess.run(
            [sys.executable, "-m", "app"],
            env=env,
            cwd=tmp_cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
    else:
        result = main_in_process(env, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 2
    assert "The bot cannot start; fix the policy file (POLICY_FILE):" in result.stderr
    assert f"  - {expected}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "bk-secret-value" not in result.stderr


async def test_without_redis_url_the_bot_starts_on_the_embedded_store(
    tmp_cwd: Path, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "BUILDKITE_", "REDIS_", "PORT", "POLICY_"))
    }
    port = free_port()
    env.update(
        SLACK_BOT_TOKEN=slack.bot_token,
        SLACK_SIGNING_SECRET="sign-secret-value",
        SLACK_API_URL=slack.api_url,
        BUILDKITE_API_TOKEN=bk.token,
        BUILDKITE_API_URL=bk.url,
        BUILDKITE_ORG=bk.org,
        PORT=str(port),
        PYTHONPATH=str(ROOT),
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", env=env, cwd=tmp_cwd, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 120  # a process's start-up, on a loaded machine
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise AssertionError("the bot did not become ready")
                await asyncio.sleep(0.05)
    finally:
        child.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(child.communicate(), 30)
    assert child.returncode == 0
    lines = [json.loads(line) for line in err.decode().splitlines()]
    warnings = [e for e in lines if "REDIS_URL is not set" in e["message"]]
    assert [e["level"] for e in warnings] == ["warning"]
    assert "lost on restart" in warnings[0]["message"]
    assert "only one bot process may run" in warnings[0]["message"]


def test_settings_type_is_the_public_interface() -> None:
    names = {name.upper() for name in Settings.model_fields}
    assert {
        "SLACK_BOT_TOKEN",
        "SLACK_SIGNING_SECRET",
        "SLACK_APP_TOKEN",
        "SLACK_API_URL",
        "BUILDKITE_API_TOKEN",
        "BUILDKITE_ORG",
        "BUILDKITE_API_URL",
        "BUILDKITE_WEBHOOK_TOKEN",
        "REDIS_URL",
        "PORT",
        "LOG_LEVEL",
    } <= names
    page = (ROOT / "docs" / "configuration.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for name in names:
        assert f"| `{name}` |" in page, f"{name} missing from docs/configuration.md's table"
        assert f"\n{name}=" in example or f"\n# {name}=" in example, (
            f"{name} missing from .env.example"
        )


def test_a_fresh_copy_of_the_example_says_what_is_empty_and_where_to_go(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_cwd: Path
) -> None:
    """`cp .env.example .env` then `python -m app`: the four required settings are empty, said
    as such (not as a malformed token), and nothing else in the example is wrong."""
    (tmp_cwd / ".env").write_text((ROOT / ".env.example").read_text())
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "BUILDKITE_", "REDIS_", "PORT", "LOG_LEVEL", "POLICY_"))
        and not k.startswith(("POLL_", "PIPELINE_", "DIGEST_"))
    }
    result = main_in_process(env, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 2
    problems = [line.strip() for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert problems == [
        "- SLACK_BOT_TOKEN is empty",
        "- SLACK_SIGNING_SECRET is empty",
        "- BUILDKITE_API_TOKEN is empty",
        "- BUILDKITE_ORG is empty",
    ], result.stderr
    assert "New here? Fill in .env" in result.stderr
    assert "python -m app sandbox" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_blank_token_given_as_an_override_is_empty_too(env: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    with pytest.raises(SettingsError) as caught:
        load_settings(slack_bot_token=SecretStr(" "), buildkite_org="")
    assert sorted(caught.value.problems) == ["BUILDKITE_ORG is empty", "SLACK_BOT_TOKEN is empty"]
