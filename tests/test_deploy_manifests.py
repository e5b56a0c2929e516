"""deploy/kubernetes, docker-compose, .env.example and .dockerignore agree with the bot: valid
against Kubernetes' own schemas (offline, strict), naming only real settings, probing real routes
on the real port, and giving the bot longer to stop than its drain can take."""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.core.policy import load_policy
from app.main import shutdown_bound
from app.settings import Settings, load_settings
from app.simulators.bot import BotClient
from app.tuning import DEFAULT

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
#: The oldest Kubernetes the manifests are meant for (PodDisruptionBudget's
#: unhealthyPodEvictionPolicy is GA there) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.31.0", "1.37.0"]
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return found


def kind(name: str) -> dict[str, Any]:
    [resource] = [doc for _, doc in manifests() if doc["kind"] == name]
    return resource


def container() -> dict[str, Any]:
    bot: dict[str, Any]
    [bot] = kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return bot


def kustomized_policy_configmap() -> dict[str, Any]:
    """The ConfigMap kustomization.yaml's generator makes (kustomize is not needed to see it)."""
    [generator] = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["configMapGenerator"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": generator["name"]},
        "data": {Path(f).name: (KUBE / f).read_text() for f in generator["files"]},
    }


def dockerfile_runtime() -> list[str]:
    """The Dockerfile's instructions after its last FROM (the image that runs)."""
    lines = (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.startswith("FROM "))
    return instructions[last_from:]


# -- Kubernetes' schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_strictly_against_kubernetes_schemas(version: str) -> None:
    resources = [*manifests(), ("kustomization.yaml", kustomized_policy_configmap())]
    kinds = {doc["kind"] for _, doc in resources}
    assert {"Deployment", "Service", "PodDisruptionBudget", "Secret", "ConfigMap"} <= kinds
    for filename, resource in resources:
        validated = kubernetes_validate.validate(resource, version, strict=True)
        assert validated == version.rsplit(".", 1)[0], (filename, validated)


def test_strict_validation_refuses_a_misspelt_field() -> None:
    """The check above can fail: the schemas are strict about unknown fields."""
    deployment = copy.deepcopy(kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_deployment_runs_two_replicas_updated_without_losing_one() -> None:
    spec = kind("Deployment")["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = kind("PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == 1 < spec["replicas"]
    labels = spec["template"]["metadata"]["labels"]
    for selector in (spec["selector"], budget["selector"]):
        assert selector["matchLabels"].items() <= labels.items()
    assert kind("Service")["spec"]["selector"].items() <= labels.items()


# -- the bot's own facts -----------------------------------------------------------------------


def test_the_manifests_set_only_real_settings() -> None:
    env = container()["env"]
    names = [variable["name"] for variable in env]
    assert set(names) <= SETTING_NAMES, set(names) - SETTING_NAMES
    assert len(names) == len(set(names))
    # Every setting the bot cannot start without is given.
    required = {n.upper() for n, field in Settings.model_fields.items() if field.is_required()}
    assert required <= set(names)
    # The secrets come from the Secret, keyed by their own names; so does REDIS_URL, which a
    # replica cannot do without (it would run an embedded store of its own).
    secret_keys = set(kind("Secret")["stringData"])
    for variable in env:
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == kind("Secret")["metadata"]["name"]
            assert ref["key"] == variable["name"] and ref["key"] in secret_keys
    from_secret = {v["name"] for v in env if "valueFrom" in v}
    secret_fields = {
        n.upper()
        for n, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    assert secret_fields <= from_secret
    redis = next(v for v in env if v["name"] == "REDIS_URL")
    assert not redis["valueFrom"]["secretKeyRef"].get("optional", False)
    assert secret_keys <= SETTING_NAMES


def test_the_example_secret_holds_placeholders_only() -> None:
    for name, value in kind("Secret")["stringData"].items():
        assert "<" in value, (name, value)
        assert not re.search(r"xox[bp]-\d|xapp-\d|bkua_[0-9a-f]{8}", value), name
    assert "data" not in kind("Secret")


def test_the_port_is_the_bots_port_everywhere() -> None:
    bot = container()
    [port] = bot["ports"]
    env = {v["name"]: v.get("value") for v in bot["env"]}
    assert port["containerPort"] == int(env["PORT"]) == Settings.model_fields["port"].default
    assert f"EXPOSE {port['containerPort']}" in dockerfile_runtime()
    for probe in ("livenessProbe", "readinessProbe"):
        assert bot[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    [service_port] = kind("Service")["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])


def test_the_pod_runs_as_the_images_user_with_a_read_only_root() -> None:
    pod = kind("Deployment")["spec"]["template"]["spec"]
    runtime = dockerfile_runtime()
    [uid] = [re.search(r"--uid (\d+)", line) for line in runtime if "useradd" in line]
    assert uid is not None
    assert f"USER {uid.group(1)}" in runtime
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Read-only holds because nothing writes .pyc files next to the code.
    assert any(line.startswith("ENV") and "PYTHONDONTWRITEBYTECODE=1" in line for line in runtime)


def test_the_policy_comes_read_only_from_the_configmap_at_policy_file() -> None:
    bot = container()
    pod = kind("Deployment")["spec"]["template"]["spec"]
    configmap = kustomized_policy_configmap()
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    [mount] = [m for m in bot["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    policy_file = next(v["value"] for v in bot["env"] if v["name"] == "POLICY_FILE")
    assert Path(policy_file).parent == Path(mount["mountPath"])
    assert Path(policy_file).name in configmap["data"]
    # The example policy is one the bot accepts.
    load_policy(str(KUBE / Path(policy_file).name))


def test_the_kustomization_names_files_that_exist_and_the_deployments_image() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KUBE / resource).is_file(), resource
    # The examples are left out: apply -k never overwrites a real Secret with placeholders.
    assert "secret.example.yaml" not in kustomization["resources"]
    [image] = kustomization["images"]
    assert container()["image"].rsplit(":", 1)[0] == image["name"]


def test_kubernetes_waits_longer_than_the_bots_drain() -> None:
    pod = kind("Deployment")["spec"]["template"]["spec"]
    pre_stop = shlex.join(container()["lifecycle"]["preStop"]["exec"]["command"])
    pause = re.fullmatch(r"sleep (\d+)", pre_stop)
    assert pause is not None
    drain = shutdown_bound(DEFAULT)
    assert drain >= DEFAULT.shutdown_grace
    assert pod["terminationGracePeriodSeconds"] > int(pause.group(1)) + drain


async def test_the_probes_and_the_services_paths_are_routes_of_the_bot(bot: BotClient) -> None:
    probes = [container()[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")]
    assert probes == ["/healthz", "/readyz"]
    for path in probes:
        async with bot.http.get(bot.base + path) as resp:
            assert resp.status == 200, (path, await resp.text())
    ingress = kind("Ingress")
    paths = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert sorted(paths) == ["/buildkite/webhook", "/slack/events"]
    for path in paths:
        # Unsigned: refused, but by the route itself (a missing route would be a 404).
        async with bot.http.post(bot.base + path, data=b"{}") as resp:
            assert resp.status in (400, 401, 403), (path, resp.status)
    async with bot.http.post(bot.base + "/no-such-route", data=b"{}") as resp:
        assert resp.status == 404


# -- docker-compose, .env.example, .dockerignore ----------------------------------------------


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """.env.example's settings: (set, commented out)."""
    given: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            given[match.group(1)] = match.group(2)
        elif match := re.fullmatch(r"# ?([A-Z][A-Z0-9_]*)=(\S*)", line):
            commented[match.group(1)] = match.group(2)
    return given, commented


def test_env_example_lists_every_setting_and_leaves_redis_unset() -> None:
    given, commented = env_example()
    assert set(given) | set(commented) == SETTING_NAMES
    assert "REDIS_URL" not in given
    assert commented["REDIS_URL"].startswith("redis://")


def test_env_example_filled_in_starts_on_the_embedded_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.upper() in SETTING_NAMES:
            monkeypatch.delenv(name)
    filled = {
        "SLACK_BOT_TOKEN": "xoxb-1-example",
        "SLACK_SIGNING_SECRET": "example-secret",
        "BUILDKITE_API_TOKEN": "example-token",
        "BUILDKITE_ORG": "acme",
    }
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        lines.append(f"{name}={filled[name]}" if name in filled else line)
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    settings = load_settings(_env_file=str(env_file))
    assert settings.redis_url is None
    assert settings.slack_app_token is None  # HTTP mode


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_sets_its_own_redis_and_shows_where_a_policy_goes() -> None:
    bot = compose()["services"]["bot"]
    redis_url = bot["environment"]["REDIS_URL"]
    assert re.fullmatch(r"redis://redis:6379/\d+", redis_url)
    assert "redis" in compose()["services"]
    mounts = [
        match.group(1)
        for line in (ROOT / "docker-compose.yml").read_text().splitlines()
        if (match := re.fullmatch(r"\s*#\s+- \./policy\.yml:(\S+?)(?::ro)?", line))
    ]
    assert len(mounts) == 1, "no commented policy.yml mount"
    [workdir] = [line.split()[1] for line in dockerfile_runtime() if line.startswith("WORKDIR")]
    policy_default = Settings.model_fields["policy_file"].default
    assert Path(mounts[0]) == Path(workdir) / policy_default


def docker_pattern(glob: str) -> re.Pattern[str]:
    """A .dockerignore line as a regex: Go's filepath.Match (`*`, `?`, `[...]` within one
    folder), plus Docker's `**` for any number of folders."""
    out, i = "", 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif glob.startswith("**", i):
            out, i = out + ".*", i + 2
        elif glob[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif glob[i] == "?":
            out, i = out + "[^/]", i + 1
        elif glob[i] == "[" and (close := glob.find("]", i)) > i:
            out, i = out + glob[i : close + 1], close + 1
        else:
            out, i = out + re.escape(glob[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: a line matching it or a folder
    above it excludes it, the last matching line wins, and `!` lines include again."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        regex = docker_pattern(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not pattern.startswith("!")
    return excluded


def test_dockerignore_keeps_what_the_image_copies_and_nothing_local() -> None:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert {"requirements.lock", "pyproject.toml", "app", "handlers", "buildkite"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignore_excludes(source), source
    # The sandbox the image runs at build time lives in the package, not in tests/.
    assert not dockerignore_excludes("app/simulators/slack.py")
    for local in (".venv", ".venv/bin/python", ".git", ".git/config", ".env", ".env.local"):
        assert dockerignore_excludes(local), local
    for cache in ("app/__pycache__/main.cpython-311.pyc", ".mypy_cache", ".pytest_cache"):
        assert dockerignore_excludes(cache), cache
