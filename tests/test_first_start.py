"""A first start: with nothing set the bot says what is missing and where to go next, and a
normal start shows no library's warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

from app.settings import Settings
from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import free_port
from app.simulators.slack import FakeSlack
from tests.test_shutdown import bot_env, bot_process, terminate, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def test_with_nothing_set_the_bot_names_what_is_missing_and_where_to_start(
    tmp_path: Path,
) -> None:
    # Only PATH and HOME: no setting in the environment, no .env in the working directory.
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    required = [
        name.upper() for name, field in Settings.model_fields.items() if field.is_required()
    ]
    assert required, "Settings has no required field: this test would prove nothing"
    for name in required:
        assert [line for line in lines if name in line and "is not set" in line], result.stderr
    # One line per missing setting: each names exactly one variable.
    missing = [line for line in lines if "is not set" in line]
    assert len(missing) == len(required), result.stderr
    # Then where to go next, after the problems.
    last_problem = max(lines.index(line) for line in missing)
    after = "\n".join(lines[last_problem + 1 :])
    assert ".env.example" in after
    assert "python -m app sandbox" in after
    assert "python -m app --check-config" in after
    assert f"no .env in {tmp_path}" in after


def test_a_bad_setting_alone_points_at_check_config_not_at_a_first_run(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    env.update(
        PYTHONPATH=str(ROOT),
        SLACK_BOT_TOKEN="xoxp-fake4",
        SLACK_SIGNING_SECRET="s3cret",
        BUILDKITE_API_TOKEN="bk",
        BUILDKITE_ORG="acme",
    )
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "SLACK_BOT_TOKEN is invalid" in result.stderr
    assert ".env.example" not in result.stderr
    assert "python -m app --check-config" in result.stderr


async def test_a_normal_start_logs_no_bolt_or_slack_sdk_warning(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, tmp_path: Path
) -> None:
    """The tokens in the environment, as Docker and Kubernetes pass them: Bolt reads
    SLACK_BOT_TOKEN from there on its own and used to warn on every start that the client's
    token wins."""
    bk.add_pipeline("web")
    port = free_port()
    env = bot_env(
        slack.api_url,
        bk,
        redis_url,
        port,
        tmp_path,
        SLACK_HOOKS_URL=slack.hooks_url,
        SLACK_BOT_TOKEN=slack.bot_token,
        LOG_LEVEL="DEBUG",
        # Where a library would write (deploy/kubernetes runs with a read-only root).
        HOME=str(tmp_path / "home"),
        TMPDIR=str(tmp_path / "tmp"),
    )
    (tmp_path / "home").mkdir()
    (tmp_path / "tmp").mkdir()
    assert env["SLACK_BOT_TOKEN"] == slack.bot_token
    async with bot_process(env, tmp_path) as bot, aiohttp.ClientSession() as http:
        await wait_healthy(http, port, tmp_path)
        # One request, so that Bolt's authorization runs: the token is still verified.
        body, headers = slack_requests.slash_command(
            "/deploy", "web", response_url=slack.response_url("r"), signing_secret=SIGNING_SECRET
        )
        async with http.post(
            f"http://127.0.0.1:{port}/slack/events", data=body, headers=headers
        ) as resp:
            assert resp.status == 200
        await slack.wait_for(lambda: bool(slack.posts("C0CHAN")))
        code, _ = await terminate(bot)
    output = (tmp_path / "bot.log").read_text()
    assert code == 0, output
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert entries, output
    # The library loggers reach this log (their INFO and up): before the fix, Bolt's warning
    # "As you gave `client` as well, `token` will be unused." was one of these entries.
    assert any("listening for Slack" in e["message"] for e in entries), output
    noisy = [
        e
        for e in entries
        if e["logger"].startswith(("slack_bolt", "slack_sdk"))
        and e["level"] in ("warning", "error", "critical")
    ]
    assert noisy == [], noisy
    # The bot wrote nothing: not in its working directory, its home or the temp directory.
    written = files_under(tmp_path)
    assert written == ["bot.log", "home", "tmp"], written
    # Bolt still verified the bot token with auth.test, and the fake accepted it.
    checks = slack.calls_to("auth.test")
    assert checks and all(call.response.get("ok") is True for call in checks), checks


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
