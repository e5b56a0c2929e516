"""The container files agree with the code: ports, command, health check, settings, pins.

No Docker here: the Dockerfile and docker-compose.yml are parsed and checked against
app/settings.py, the README and requirements.lock.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {name.upper() for name in Settings.model_fields}
DEFAULT_PORT = Settings.model_fields["port"].default


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), per stage."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def env_names(stage: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for args in instructions(stage, "ENV"):
        for name, value in re.findall(r"(\w+)=(\S+)", args):
            found[name] = value
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_the_image_is_built_in_stages_and_runs_slim_and_unprivileged() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    runtime = stages[-1]
    assert re.fullmatch(r"python:3\.\d+-slim", instructions(runtime, "FROM")[0])
    (user,) = instructions(runtime, "USER")
    assert user not in ("root", "0")
    # Nothing from the build stage but the virtualenv reaches the runtime image.
    assert instructions(runtime, "COPY") == ["--from=build /opt/venv /opt/venv"]


def test_dependencies_come_from_the_lock_file() -> None:
    build = dockerfile_stages()[0]
    runs = instructions(build, "RUN")
    assert "pip install -r requirements.lock" in runs
    assert any(run.startswith("pip install --no-deps .") for run in runs)
    for source in (a.split()[0] for a in instructions(build, "COPY")):
        assert (ROOT / source).exists(), source


def test_the_image_holds_the_installed_package_and_no_source_tree() -> None:
    build, runtime = dockerfile_stages()[0], dockerfile_stages()[-1]
    installs = [run for run in instructions(build, "RUN") if run.startswith("pip install")]
    # Installed, not linked to /src: an editable install would break once /src is left behind.
    assert not any("-e" in run.split() or "--editable" in run for run in installs)
    for stage in (build, runtime):
        assert "PYTHONPATH" not in env_names(stage)
    (source,) = instructions(build, "WORKDIR")
    assert instructions(runtime, "WORKDIR") != [source]
    assert not any(source in args for args in instructions(runtime, "COPY"))


def test_the_build_copies_everything_the_package_is_built_from() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {
        name for args in instructions(dockerfile_stages()[0], "COPY") for name in args.split()
    }
    project = pyproject["project"]
    assert {"pyproject.toml", project["readme"], *project["license-files"]} <= copied
    setuptools = pyproject["tool"]["setuptools"]
    packages = {name.rstrip("*") for name in setuptools["packages"]["find"]["include"]}
    packages |= {name.split(".")[0] for name in setuptools.get("package-data", {})}
    assert packages <= copied


def test_the_image_runs_the_sandbox_with_nothing_but_the_package() -> None:
    runtime = dockerfile_stages()[-1]
    names = [instruction for instruction, _ in runtime]
    (smoke,) = [run for run in instructions(runtime, "RUN") if "-m app sandbox" in run]
    # As the bot's user in its home, after only the virtualenv was copied in.
    position = names.index("RUN", names.index("WORKDIR"))
    assert runtime[position] == ("RUN", smoke)
    assert names.index("USER") < position
    assert re.search(r'--run "/deploy \w+ \w+" \| grep "passed in"$', smoke), smoke


def test_the_lock_file_pins_every_runtime_dependency() -> None:
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[norm(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name = norm(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} is missing from requirements.lock; see its header"
    assert "lupa" in pins  # fakeredis[lua]: the embedded store runs the store's Lua scripts


def test_command_port_and_health_check_match_the_bot() -> None:
    runtime = dockerfile_stages()[-1]
    (cmd,) = instructions(runtime, "CMD")
    assert json.loads(cmd) == ["python", "-m", "app"]
    assert "python -m app" in (ROOT / "README.md").read_text()
    assert instructions(runtime, "EXPOSE") == [str(DEFAULT_PORT)]
    env = env_names(runtime)
    assert env["PORT"] == str(DEFAULT_PORT)
    for name in env:
        assert name in SETTINGS or name in ("PATH",) or name.startswith(("PYTHON", "PIP_"))
    (healthcheck,) = instructions(runtime, "HEALTHCHECK")
    assert "/healthz" in healthcheck and "PORT" in healthcheck
    assert json.loads(healthcheck.split("CMD", 1)[1])[0] == "python"


def test_compose_runs_the_bot_with_a_persistent_redis(compose: dict[str, Any]) -> None:
    bot, redis = compose["services"]["bot"], compose["services"]["redis"]
    assert bot["build"] == "."
    assert bot["env_file"] in (".env", [".env"])
    environment = bot["environment"]
    assert set(environment) <= SETTINGS
    assert environment["REDIS_URL"].startswith("redis://redis:")
    assert bot["ports"] == [f"{environment['PORT']}:{DEFAULT_PORT}"]
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert set(compose["volumes"]) == {v.split(":")[0] for v in redis["volumes"]}


def test_env_example_lists_exactly_the_settings() -> None:
    example = (ROOT / ".env.example").read_text()
    # A setting left unset on purpose (REDIS_URL: the embedded store) is shown commented out.
    names = set(re.findall(r"^(?:# )?([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    assert names == SETTINGS
    for name in names:  # each with a comment just above it, or in its group's comment
        assert re.search(rf"#[^\n]*\n(?:[A-Z_]+=[^\n]*\n)*(?:# )?{name}=", example), name
