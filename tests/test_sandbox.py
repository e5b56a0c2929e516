"""`python -m app sandbox`: the real bot against the fakes, driven by a script, as a transcript."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

from app import sandbox

ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "BUILDKITE_", "REDIS_", "PORT", "LOG_LEVEL", "POLICY_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_a_scripted_session_prints_a_transcript(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "sandbox",
            "--speed",
            "10",
            "--run",
            "/deploy web main",
            "--run",
            "Rebuild",
        ],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        "Sandbox: the bot listens on http://127.0.0.1:",
        "> /deploy web main",
        "  only you: ⏳ Starting a build of `web`…",
        "  #deploys, new message:",
        "    web #1 (https://buildkite.com/acme/web/builds/1)",
        "    State: ⏳ Scheduled · Branch: `main` · Commit: `HEAD` · Requested by: @alice",
        "[1] Cancel · Open in Buildkite (https://buildkite.com/acme/web/builds/1)",
        "State: ▶️ Running",
        "  #deploys, thread of web #1: ▶️ web #1 (https://buildkite.com/acme/web/builds/1) "
        "started running.",
        "State: ✅ Passed",
        "Rebuild · Open in Buildkite",
        "@alice ✅ web #1 (https://buildkite.com/acme/web/builds/1) passed in",
        "> Rebuild",
        "web #2 (https://buildkite.com/acme/web/builds/2)",
    ):
        assert expected in out, f"{expected!r} not in the transcript:\n{out}"
    assert out.index("> Rebuild") > out.index("passed in")  # each step waits for the builds
    assert "REDIS_URL is not set" in result.stderr  # the embedded store, said once
    assert "did not expect" not in result.stderr


async def test_failing_builds_buttons_and_mistakes(tmp_path: Path) -> None:
    args = argparse.Namespace(fail=True, speed=10.0, redis_url=None)
    out = io.StringIO()
    lines = ["# comments are skipped", "/deploy web", "1", "Rebuild", "/deploy nope", "help"]
    assert await sandbox.run(args, lines, out) == 0
    transcript = out.getvalue()
    assert "# comments" not in transcript
    for expected in (
        "State: ⚠️ Failing",
        "is failing: a job has failed, others still run.",
        "State: ❌ Failed",
        "  #deploys, thread of web #1 (also sent to the channel):",
        "    Failed jobs:",
        "    • Test (https://buildkite.com/acme/web/builds/1#",
        "> 1",
        "  (confirmed: Cancel web #1?)",
        "  That Cancel button is no longer on its message.",
        "Rebuild started: web #2 (https://buildkite.com/acme/web/builds/2)",
        "Pipeline `nope` was not found",
        "Type a slash command",
    ):
        assert expected in transcript, f"{expected!r} not in the transcript:\n{transcript}"


def test_outside_a_source_checkout_it_says_what_to_do(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['tests'] = None\n"
        "from app.__main__ import main\n"
        "sys.exit(main(['sandbox']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "source checkout" in result.stderr
    assert "Traceback" not in result.stderr
