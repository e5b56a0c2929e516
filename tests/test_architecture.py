"""The rooms of the code base keep to their walls: what each package may import
(docs/architecture.md). A new import across a wall fails here, with the line that made it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "handlers", "buildkite")

#: package -> the packages it must not import (a prefix matches its sub-modules too).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The API client knows nothing of Slack, Redis or the bot.
    "buildkite": ("app", "handlers"),
    # Storage keeps records; it does not know who reads them.
    "app.storage": ("app.core", "app.slack", "app.tracking", "handlers", "app.main", "app.agents"),
    # Tracking follows builds and writes to Slack; the product's rules listen to it, not back.
    "app.tracking": ("app.core", "handlers", "app.main", "app.web", "app.agents"),
    # The rules never reach a listener or the composition root.
    "app.core": ("handlers", "app.main", "app.web", "app.agents"),
    # Slack's boundary renders and sends; it takes from core only the leaf modules below.
    "app.slack": ("app.tracking", "handlers", "app.main", "app.web", "app.agents"),
    "app.ops": ("app.tracking", "handlers", "app.main", "app.slack.render"),
    "handlers": ("app.main", "app.web", "app.tracking", "app.agents"),
    # Agents (MCP) call the core's services like the listeners do: never a listener, the
    # composition root, the web app, or Slack's writer directly.
    "app.agents": (
        "handlers",
        "app.main",
        "app.web",
        "app.slack.outbox",
        "app.simulators",
        "app.sandbox",
    ),
}
#: Only these import the agents' room (the composition root, and `python -m app mcp`).
AGENTS_IMPORTERS = ("app.main", "app.agents", "app.__main__")
#: What app.slack may take from app.core: data and errors, no services.
SLACK_MAY_USE_FROM_CORE = ("app.core.errors", "app.core.names", "app.core.unblock_forms")
#: Only these import the listeners (the composition root wires them).
HANDLERS_IMPORTERS = ("app.main", "handlers")
#: Only these import the simulators (the product's sandbox; tests and bench are outside app/).
SIMULATORS_IMPORTERS = ("app.sandbox", "app.simulators")


def _imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, "file:line") for every import of our packages."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                targets: list[str] = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                found += [
                    (module, target, where)
                    for target in targets
                    if target.split(".")[0] in PACKAGES
                ]
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


IMPORTS = _imports()


def test_the_scan_sees_the_code() -> None:
    importers = {module for module, _, _ in IMPORTS}
    assert {"app.main", "app.core.deploys", "app.slack.render.builds", "handlers.deploy"} <= (
        importers
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_across_its_walls(package: str) -> None:
    crossings = [
        f"{where}: {module} imports {target}"
        for module, target, where in IMPORTS
        if _within(module, package) and any(_within(target, wall) for wall in FORBIDDEN[package])
    ]
    assert not crossings, "\n".join(crossings)


def test_slack_takes_only_data_and_errors_from_core() -> None:
    crossings = [
        f"{where}: {module} imports {target}"
        for module, target, where in IMPORTS
        if _within(module, "app.slack")
        and _within(target, "app.core")
        and not any(_within(target, allowed) for allowed in SLACK_MAY_USE_FROM_CORE)
        and target not in ("app.core",)
    ]
    assert not crossings, "\n".join(crossings)


@pytest.mark.parametrize(
    ("wired", "importers"),
    [
        ("handlers", HANDLERS_IMPORTERS),
        ("app.simulators", SIMULATORS_IMPORTERS),
        ("app.agents", AGENTS_IMPORTERS),
    ],
)
def test_only_their_owners_import_the_listeners_and_the_simulators(
    wired: str, importers: tuple[str, ...]
) -> None:
    crossings = [
        f"{where}: {module} imports {target}"
        for module, target, where in IMPORTS
        if _within(target, wired) and not any(_within(module, owner) for owner in importers)
    ]
    assert not crossings, "\n".join(crossings)
