"""`python -m app sandbox`: the real bot against the fakes, driven by a script, as a transcript."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import io
import logging
import os
import pty
import select
import shutil
import site
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest

from app import sandbox
from app.core.policy.loading import load_policy
from app.sandbox.cli import HideUnhandledRequests, demo_policy_path
from app.sandbox.session import PEOPLE, Session
from app.sandbox.terminal import render_text, slack_date
from app.simulators.bot import WEBHOOK_TOKEN, running_bot
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
        # No policy.yml here: the header says so, and where approvals and locks are shown.
        "; no policy: everyone may do everything (try --policy demo);",
        "> /deploy web main",
        "  only alice: ⏳ Starting a build of `web` if it exists and you may deploy it…",
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
    args = argparse.Namespace(fail=True, speed=10.0, redis_url=None, person="alice", policy=None)
    out = io.StringIO()
    lines = ["# comments are skipped", "/deploy web", "1", "Rebuild", "/deploy nope", "help"]
    assert await sandbox.run(args, lines, out) == 0
    transcript = out.getvalue()
    assert "# comments" not in transcript
    # The build had finished: its Cancel button was gone before anyone was asked to confirm.
    assert "(confirmed: Cancel web #1?)" not in transcript
    for expected in (
        "State: ⚠️ Failing",
        "is failing: a job has failed, others still run.",
        "State: ❌ Failed",
        "  #deploys, thread of web #1 (also sent to the channel):",
        "    Failed jobs:",
        "    • Test (https://buildkite.com/acme/web/builds/1#",
        "alice> 1",
        "  That Cancel button is no longer on its message.",
        "Rebuild started: web #2 (https://buildkite.com/acme/web/builds/2)",
        "Pipeline `nope` was not found",
        "Type a slash command",
    ):
        assert expected in transcript, f"{expected!r} not in the transcript:\n{transcript}"


async def test_a_line_waits_for_the_bot_to_answer_the_one_before(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
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


def test_a_build_passes_through_every_state_however_late_the_simulator_looks() -> None:
    """The simulator may look at a build long after two of its states were due (a loaded
    machine): it still moves one state a look, so that each one is sent to the bot."""
    bk = FakeBuildkite()
    bk.add_pipeline("web")
    bk.add_agent("builder-1")
    build = bk.add_build("web", state="scheduled")
    session = Session(None, bk, None, io.StringIO(), fail=False, speed=10.0)
    born = {build["id"]: time.monotonic() - 60}  # both running and passed are overdue
    seen = []
    for _ in range(3):
        session.advance(build, born)
        seen.append(build["state"])
    assert seen == ["running", "passed", "passed"]


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


# Building the wheel (setuptools in an isolated environment of its own) took over 60 s on a
# loaded two-core CI machine: deadlines for a hang, not for speed.
@pytest.mark.timeout(600)
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
    subprocess.run([*pip, "wheel", "--no-deps", "-w", wheels, source], check=True, timeout=300)
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
    subprocess.run([*pip, *install], check=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(source)
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    run = [python, "-I", "-m", "app", "sandbox", "--speed", "10", "--run", "/deploy web main"]
    result = subprocess.run(
        run, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=120
    )
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
    demo = subprocess.run(
        [python, "-I", "-c", "from app.sandbox.cli import demo_policy_path as p; print(p())"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(demo).is_relative_to(venv) and Path(demo).is_file(), demo  # in the wheel


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


# -- Slack's markup, drawn as Slack draws it ---------------------------------------------------


class Workspace:
    users: ClassVar = {"U0USER": {"name": "alice"}, "U0BOB": {"name": "bob"}}
    channels: ClassVar = {"C0CHAN": {"name": "deploys"}, "C0OPS": {"name": "ops"}}


def test_dates_channels_and_people_are_drawn_as_slack_shows_them() -> None:
    stamp = 1392734382  # Slack's own example: 2014-02-18 14:39:42 UTC
    drawn = render_text(
        f"<!date^{stamp}^{{date_short}} at {{time}}|Feb 18> · "
        f"<!date^{stamp}^{{date_num}} {{time_secs}}|x> · "
        f"<!date^{stamp}^{{date_long}}^https://example.com/when|x> · "
        f"<!date^{stamp}^{{date}} {{date_long_full}} {{date_slash}}|x> · "
        f"<#C0CHAN> <#C0OPS|operations> <#C0GONE> <@U0BOB> <@U0NOBODY>",
        Workspace,
        tz=UTC,
    )
    assert drawn == (
        "Feb 18, 2014 at 2:39 PM · 2014-02-18 2:39:42 PM · "
        "Tuesday, February 18th, 2014 (https://example.com/when) · "
        "February 18th, 2014 February 18, 2014 18/02/2014 · "
        "#deploys #operations #C0GONE @bob @U0NOBODY"
    )


def test_a_date_slack_cannot_read_shows_its_fallback() -> None:
    for inner in ("abc^{date}|later", "1392734382^{nonsense}|later", "1392734382|later"):
        assert render_text(f"until <!date^{inner}>", Workspace, tz=UTC) == "until later"


def test_pretty_dates_say_today_yesterday_tomorrow() -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    for days, word in ((0, "today"), (-1, "yesterday"), (1, "tomorrow")):
        stamp = int((now + timedelta(days=days)).timestamp())
        assert slack_date(f"{stamp}^{{date_short_pretty}}|x", UTC, now) == word
    old = int(datetime(2025, 1, 2, tzinfo=UTC).timestamp())
    assert slack_date(f"{old}^{{date_pretty}}|x", UTC, now) == "January 2nd, 2025"


# -- buttons, people, the demo policy ----------------------------------------------------------


@contextlib.asynccontextmanager
async def sandbox_session(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, out: io.StringIO, **settings: Any
) -> AsyncIterator[Session]:
    """The sandbox's session on the bot; its tests take `redis_client`, which flushes Redis (a
    Cancel pressed on web #1 by an earlier test would otherwise be the same click)."""
    bk.webhook_token = WEBHOOK_TOKEN  # the bot's, as running_bot sets it
    bk.add_pipeline("web", default_branch="main")
    bk.add_pipeline("api", default_branch="main")
    for name in ("builder-1", "builder-2", "builder-3"):
        bk.add_agent(name)
    slack.add_user("U0BOB", "bob", "bob@example.com")
    async with running_bot(slack, bk, redis_url, **settings) as client:
        session = Session(slack, bk, client, out, fail=False, speed=10.0)
        simulator = asyncio.create_task(session.simulate_builds())
        try:
            yield session
        finally:
            simulator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await simulator


def shown(session: Session, label: str) -> list[int]:
    """The numbers of the buttons with this label printed so far."""
    session.flush()
    return [n for n, c in session.choices.items() if c.label == label]


def printed(session: Session, out: io.StringIO, text: str) -> bool:
    session.flush()
    return text in out.getvalue()


async def test_a_number_not_shown_and_a_stale_button_get_an_answer_and_no_question(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    out = io.StringIO()
    async with sandbox_session(slack, bk, redis_url, out) as session:
        await session.scripted(["/deploy web main"])
        cancel = next(n for n, c in session.choices.items() if c.label == "Cancel")
        # As if typed at the terminal: a "y" waits, should the sandbox ask [y/N].
        session.reader = asyncio.StreamReader()
        session.reader.feed_data(b"y\n")
        await session.handle(str(cancel))
        await session.handle("99")
    transcript = out.getvalue()
    assert "  That Cancel button is no longer on its message." in transcript, transcript
    assert "[y/N]" not in transcript
    assert "\n  no button 99\n" in transcript
    assert bk.requests_to("PUT", "/organizations/acme/pipelines/web/builds/1/cancel") == []


async def test_a_button_still_shown_asks_first_and_presses_as_the_one_speaking(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    out = io.StringIO()
    async with sandbox_session(slack, bk, redis_url, out) as session:
        session.timeline = ((60.0, "running"),)  # the build stays scheduled: Cancel stays
        await session.handle("/deploy web main")
        cancel, *_ = await slack.wait_for(lambda: shown(session, "Cancel"), timeout=30)
        session.switch_to("bob")
        session.reader = asyncio.StreamReader()
        session.reader.feed_data(b"y\n")
        await session.handle(str(cancel))
        path = "/organizations/acme/pipelines/web/builds/1/cancel"
        # Bolt runs the listener after the ack: wait for what it sent Buildkite, and said.
        (cancel_request,) = await slack.wait_for(lambda: bk.requests_to("PUT", path), timeout=30)
        await slack.wait_for(lambda: printed(session, out, "State: 🚫 Canceled"), timeout=30)
    transcript = out.getvalue()
    assert "  Cancel web #1? [y/N]" in transcript, transcript
    assert "  only bob: 🚫 Cancel requested for web #1" in transcript, transcript
    assert "State: 🚫 Canceled" in transcript
    assert cancel_request.json is None
    assert len(bk.requests_to("PUT", path)) == 1


async def test_as_switches_people_and_the_prompt_says_who_speaks(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    out = io.StringIO()
    async with sandbox_session(slack, bk, redis_url, out) as session:
        await session.scripted(
            ["as bob", "/deploy lock api", "as carol", "/as alice", "as", "as alice", "/deploy api"]
        )
    transcript = out.getvalue()
    assert "alice> as bob\n  you are now @bob" in transcript
    assert "bob> /deploy lock api" in transcript
    assert "🔒 @bob locked `api`" in transcript
    assert "nobody called 'carol' here; the sandbox has alice (an engineer), bob (" in transcript
    assert "bob> /as alice\n  you are now @alice" in transcript
    assert "as whom?" in transcript
    assert "alice> /deploy api" in transcript
    assert "  only alice: 🔒 `api` is locked by @bob" in transcript, transcript


async def test_an_ephemeral_button_is_only_for_the_one_who_sees_it(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    out = io.StringIO()
    demo = str(demo_policy_path())
    async with sandbox_session(slack, bk, redis_url, out, policy_file=demo) as session:
        await session.scripted(["/deploy web main", "as bob", "Deploy"])
    transcript = out.getvalue()
    assert "That Deploy button is in a message only @alice sees." in transcript, transcript
    assert "asks to deploy" not in transcript


def test_the_demo_policy_loads_with_the_bots_own_loader() -> None:
    policy = load_policy(demo_policy_path())
    data = policy.data
    web, api = data.pipelines["web"], data.pipelines["api"]
    assert web.protected and web.approval is not None
    assert web.approval.approvers == [PEOPLE["bob"].user_id]
    assert api.deployers == [PEOPLE["bob"].user_id]
    assert PEOPLE["alice"].user_id in (data.default.deployers or [])
    assert data.agent_stoppers == [PEOPLE["bob"].user_id]


async def test_as_and_policy_demo_on_the_command_line(tmp_path: Path) -> None:
    args = argparse.Namespace(fail=False, speed=10.0, redis_url=None, person="bob", policy="demo")
    out = io.StringIO()
    assert await sandbox.run(args, ["/deploy api main"], out) == 0
    transcript = out.getvalue()
    assert "You are @bob in #deploys" in transcript and "the demo policy" in transcript
    assert "bob> /deploy api main" in transcript
    assert "@bob ✅ api #1 (https://buildkite.com/acme/api/builds/1) passed in" in transcript


def test_unknown_people_and_policy_files_are_refused_plainly(tmp_path: Path) -> None:
    for extra, said in (
        (["--as", "carol"], "invalid choice: 'carol'"),
        (["--policy", "nope.yml"], "--policy: no file 'nope.yml' (or use --policy demo)"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "app", "sandbox", *extra, "--run", "help"],
            env=child_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        assert said in result.stderr and "Traceback" not in result.stderr


def test_a_malformed_policy_is_named_line_by_line_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yml"
    bad.write_text("pipelines:\n  web:\n    deployer: [U0USER]\n    protected: maybe\n")
    for extra in ([], ["--policy", str(bad)]):  # ./policy.yml, as the bot reads it, or --policy
        result = subprocess.run(
            [sys.executable, "-m", "app", "sandbox", *extra, "--run", "help"],
            env=child_env(),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert any("line 3: pipelines.web.deployer: Extra inputs" in line for line in lines)
        assert any("line 4: pipelines.web.protected:" in line for line in lines)
        assert "Traceback" not in result.stderr and result.stdout == ""


def test_bolts_developer_hints_stay_out_of_the_sandbox(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "sandbox", "--speed", "10", "--run", "/nope now"],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "is /nope one of its commands?" in result.stdout
    assert "Unhandled request" not in result.stderr and "[Suggestion]" not in result.stderr
    assert "REDIS_URL is not set" in result.stderr  # other warnings still show


def test_the_filter_hides_only_bolts_unhandled_request_line() -> None:
    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)

    quiet = HideUnhandledRequests()
    assert not quiet.filter(record("slack_bolt", "Unhandled request (body not logged)"))
    assert quiet.filter(record("slack_bolt", "Failed to run a middleware"))
    assert quiet.filter(record("app.main", "Unhandled request (ours)"))


# -- agents: Stop and Force stop, tried in the sandbox -----------------------------------------


async def test_force_stop_on_a_busy_agent_cancels_its_build_in_the_sandbox(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    out = io.StringIO()
    demo = str(demo_policy_path())
    async with sandbox_session(slack, bk, redis_url, out, policy_file=demo) as session:
        session.switch_to("bob")
        session.timeline = ((0.0, "running"),)  # runs until stopped
        await session.handle("/deploy api main")
        await slack.wait_for(lambda: any(a["job"] for a in bk.agents.values()), timeout=30)
        await session.handle("/buildkite agents")
        force, *_ = await slack.wait_for(lambda: shown(session, "Force stop"), timeout=30)
        await session.handle(str(force))  # builder-1, busy on Test
        stopped = "(Buildkite: agent builder-1 is stopped)"
        await slack.wait_for(lambda: printed(session, out, stopped), timeout=30)
        await slack.wait_for(lambda: printed(session, out, "State: 🚫 Canceled"), timeout=30)
    transcript = out.getvalue()
    assert "🟢 busy on Test (https://buildkite.com/acme/api/builds/1#" in transcript, transcript
    assert "(Buildkite: agent builder-1 is stopped)" in transcript
    assert bk.build("api", 1)["state"] == "canceled"
    stops = [r.json for r in bk.requests_to("PUT", "/organizations/acme/agents/")]
    assert stops == [{"force": True}]


async def test_a_build_waits_while_no_agent_is_idle_and_the_line_goes_on(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    out = io.StringIO()
    async with sandbox_session(slack, bk, redis_url, out) as session:
        for agent in bk.agents.values():
            agent["connection_state"] = "stopped"
        await session.scripted(["/deploy web main", "/deploy locks"])
    transcript = out.getvalue()
    assert "(Buildkite: web #1 waits: no agent is connected and idle)" in transcript, transcript
    assert "alice> /deploy locks" in transcript
    assert "still busy" not in transcript  # a waiting build rests: the next line did not wait
    assert bk.build("web", 1)["state"] == "scheduled"


@pytest.mark.timeout(300)
def test_at_a_terminal_the_prompt_names_the_speaker_and_buttons_ask_first(tmp_path: Path) -> None:
    """Typed at a terminal (a pty): the prompt says who speaks, a confirmed button asks [y/N]."""
    master, replica = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "app", "sandbox", "--speed", "10", "--policy", "demo"],
        stdin=replica,
        stdout=replica,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        cwd=tmp_path,
    )
    os.close(replica)
    seen = b""

    def until(text: str) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while text.encode() not in seen:
            assert time.monotonic() < deadline, f"{text!r} never came:\n{seen.decode()}"
            if select.select([master], [], [], 0.1)[0]:
                seen += os.read(master, 65536)

    try:
        until("alice> ")
        os.write(master, b"as bob\n")
        until("bob> ")
        os.write(master, b"/buildkite agents\n")
        until("[6] Force stop")
        os.write(master, b"6\n")
        until("Stop builder-3 now? Its current job is canceled. [y/N]")
        os.write(master, b"n\n")
        os.write(master, b"7\n")
        until("no button 7")
        os.write(master, b"quit\n")
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        os.close(master)
    assert b"Force-stopped" not in seen  # "n" kept it
