"""The scripted tour of docs/sandbox.md, run as printed there: the doc stays true."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sandbox import ROOT, child_env


def documented_tour(page: str = "docs/sandbox.md") -> list[str]:
    """The tour's command, as the page prints it (after its `<!-- tour: -->` marker)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    found = re.search(r"<!-- tour:[^>]*-->\n```sh\n(.*?)```", text, re.S)
    assert found, f"{page} lost its tour"
    return shlex.split(found.group(1).replace("\\\n", " "))


def test_the_readme_shows_the_same_tour() -> None:
    assert documented_tour("README.md") == documented_tour()


def test_the_tour_is_one_sandbox_command_of_run_lines() -> None:
    argv = documented_tour()
    assert argv[:5] == ["python", "-m", "app", "sandbox", "--policy"]
    assert argv.count("--run") >= 10


@pytest.mark.timeout(300)
def test_the_documented_tour_shows_what_the_doc_says(tmp_path: Path) -> None:
    argv = documented_tour()
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [
        "alice> /deploy api main",
        "⛔ You may not deploy `api`: policy rule `api` allows it to @bob.",
        "alice> /deploy web main",
        "🛡️ `web` is protected. Deploy this?",
        "[1] Deploy · [2] Cancel",
        "alice> Deploy",
        "✋ @alice asks to deploy `web`. Approval needed from @bob",
        "bob> Approve",
        "✅ Deploy of `web` requested by @alice was approved by @bob. Started web #1",
        "State: ✅ Passed",
        "@alice ✅ web #1 (https://buildkite.com/acme/web/builds/1) passed in",
        "bob> /deploy lock web release freeze",
        "🔒 @bob locked `web` until unlocked: release freeze.",
        "alice> /deploy web main",
        "🔒 `web` is locked by @bob (release freeze).",
        "bob> /buildkite agents",
        "builder-3 (https://buildkite.com/organizations/acme/agents/",
        "bob> Stop",
    ]
    at = 0
    for step in steps:
        found = out.find(step, at)
        assert found >= 0, f"{step!r} not in the transcript after position {at}:\n{out}"
        at = found
    # The approval's thread is named by its first sentence, not cut inside the build's link.
    approval = "✅ Deploy of `web` requested by @alice was approved by @bob"
    assert f"  #deploys, thread of {approval}:\n" in out
    assert "(https:\n" not in out
    assert "🛑 Asked `builder-3` to stop once its current job finishes." in out
    assert "(Buildkite: agent builder-3 is stopped)" in out
    last_list = out.rsplit("bob> /buildkite agents", 1)[1]
    assert "builder-1" in last_list and "builder-2" in last_list
    assert "builder-3" not in last_list  # Buildkite lists connected agents only
    assert "did not expect" not in result.stderr
    assert "Traceback" not in result.stderr
