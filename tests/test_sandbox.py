"""`python -m app sandbox`: the real bot against the fakes, driven by a script, as a transcript."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import io
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from app import sandbox
from app.sandbox.session import Session
from app.simulators.bot import running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.test_container import dockerfile_stages, instructions

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
        "  only you: ⏳ Starting a build of `web` if it exists and you may deploy it…",
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


async def test_a_line_waits_for_the_bot_to_answer_the_one_before(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str
) -> None:
    """A slow first call to Buildkite (a cold start): the build's message, and so its Cancel
    button, comes long after the slash command's answer, and the next line presses it."""
    bk.add_pipeline("web", default_branch="main")
    bk.delay_next(1, 2.0, "/builds", method="POST")
    out = io.StringIO()
    async with running_bot(slack, bk, redis_url) as client:
        session = Session(slack, bk, client, out, fail=False, speed=10.0)
        simulator = asyncio.create_task(session.simulate_builds())
        try:
            await session.scripted(["/deploy web main", "Cancel"])
        finally:
            simulator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await simulator
    transcript = out.getvalue()
    assert "Type a slash command" not in transcript, transcript
    assert "(confirmed: Cancel web #1?)" in transcript, transcript
    assert bk.requests_to("PUT", "/organizations/acme/pipelines/web/builds/1/cancel"), transcript


def test_without_the_simulators_it_says_what_to_do(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['app.simulators'] = None\n"
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
    assert "reinstall the bot's package" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_the_installed_package_runs_it_from_any_directory(tmp_path: Path) -> None:
    """Built from only what the Dockerfile copies, installed, run far from the checkout."""
    source = tmp_path / "src"
    source.mkdir()
    caches = shutil.ignore_patterns("__pycache__")
    for name in dockerfile_copies():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=caches)
        else:
            shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "-w", wheels, source], check=True, timeout=60)
    # A venv of its own that borrows the dependencies of this one, but not its editable install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (wheel,) = wheels.glob("*.whl")
    install = ["--python", python, "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run([*pip, *install], check=True, timeout=60)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(source)
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    run = [python, "-I", "-m", "app", "sandbox", "--speed", "10", "--run", "/deploy web main"]
    result = subprocess.run(run, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for expected in (
        "> /deploy web main",
        "    web #1 (https://buildkite.com/acme/web/builds/1)",
        "State: ✅ Passed",
        "@alice ✅ web #1 (https://buildkite.com/acme/web/builds/1) passed in",
    ):
        assert expected in result.stdout, f"{expected!r} not in the transcript:\n{result.stdout}"
    assert "did not expect" not in result.stderr
    where = subprocess.run(
        [python, "-I", "-c", "import app.simulators.slack as m; print(m.__file__)"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert Path(where.strip()).is_relative_to(venv), where


def test_the_bot_and_the_benchmarks_never_import_the_tests() -> None:
    """The simulators are the product's: nothing outside tests/ may reach into it."""
    for path in [*(ROOT / "app").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "tests", f"{path.relative_to(ROOT)} imports {name}"


def dockerfile_copies() -> list[str]:
    """What the Dockerfile's build stage copies from the checkout."""
    (build, *_) = dockerfile_stages()
    return [name for args in instructions(build, "COPY") for name in args.split()[:-1]]
