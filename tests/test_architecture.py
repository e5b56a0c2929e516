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
    "app.storage": (
        "app.core",
        "app.slack",
        "app.tracking",
        "handlers",
        "app.main",
        "app.web",
        "app.agents",
        "app.ledger_cli",
        "app.sandbox",
    ),
    # Tracking follows builds and writes to Slack; the product's rules listen to it, not back.
    "app.tracking": ("app.core", "handlers", "app.main", "app.web", "app.agents", "app.ledger_cli"),
    # The rules never reach a listener, a surface or a composition root.
    "app.core": ("handlers", "app.main", "app.web", "app.agents", "app.ledger_cli", "app.sandbox"),
    # Slack's boundary renders and sends; it takes from core only the leaf modules below, and
    # never calls Buildkite.
    "app.slack": (
        "app.tracking",
        "handlers",
        "app.main",
        "app.web",
        "app.agents",
        "app.ledger_cli",
        "buildkite.client",
    ),
    # Renderers are pure functions of records: no sender, no Redis, no Buildkite call.
    "app.slack.render": (
        "app.slack.outbox",
        "app.slack.response_urls",
        "app.slack.directory",
        "app.slack.clicks",
        "app.slack.verification",
        "app.storage.store",
        "app.storage.connection",
        "app.ops",
    ),
    "app.ops": ("app.tracking", "handlers", "app.main", "app.slack.render", "app.agents"),
    # A listener calls one core service: never Buildkite itself, nor a tracker.
    "handlers": ("app.main", "app.web", "app.tracking", "app.agents", "buildkite.client"),
    # Agents (MCP) call the core's services like the listeners do: never a listener, the
    # composition root, the web app, Slack's writer, or Buildkite itself (one way through). Of
    # slack and tracking they take only the leaf modules below; waits wake on storage's changes.
    "app.agents": (
        "handlers",
        "app.main",
        "app.web",
        "app.slack.outbox",
        "app.slack.response_urls",
        "app.simulators",
        "app.sandbox",
        "app.ledger_cli",
        "buildkite.client",
    ),
    # `python -m app ledger rebuild` reads Buildkite into the ledger; it posts nothing to Slack.
    "app.ledger_cli": (
        "handlers",
        "app.main",
        "app.web",
        "app.agents",
        "app.slack",
        "app.tracking",
    ),
}
#: Only these import the agents' room (the composition root, and `python -m app mcp`).
AGENTS_IMPORTERS = ("app.main", "app.agents", "app.__main__")
#: What app.slack may take from app.core: data and errors, no services.
SLACK_MAY_USE_FROM_CORE = ("app.core.errors", "app.core.names", "app.core.unblock_forms")
#: What the agents take from Slack's room and from tracking: who acts, the unblock button's model
#: (the service takes it), the digest's models, a freeze's view and its refusal, a rollback's or a
#: promotion's refusal (an agent is told the sentence a person is), the phases; never a sender or
#: a tracker.
AGENTS_MAY_USE_FROM_SLACK = (
    "app.slack.actor",
    "app.slack.payloads",
    "app.slack.render.digest",
    "app.slack.render.freezes",
    "app.slack.render.releases",
)
AGENTS_MAY_USE_FROM_TRACKING = ("app.tracking.phases",)
#: Only these import the listeners (the composition root wires them).
HANDLERS_IMPORTERS = ("app.main", "handlers")
#: Only these import the simulators (the product's sandbox; tests and bench are outside app/).
SIMULATORS_IMPORTERS = ("app.sandbox", "app.simulators")
#: The commands `python -m app` runs besides the bot: only its entry point imports them.
LEDGER_CLI_IMPORTERS = ("app.__main__", "app.ledger_cli")
SANDBOX_IMPORTERS = ("app.__main__", "app.sandbox")
#: The composition root: the entry point, the sandbox and the test bot build the app through it.
MAIN_IMPORTERS = ("app.__main__", "app.sandbox", "app.simulators.bot")
#: Third-party modules that do I/O, which a renderer must not import.
RENDER_MUST_NOT_IMPORT = ("redis", "httpx", "aiohttp", "slack_sdk.web", "slack_bolt", "mcp")


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


@pytest.mark.parametrize(
    ("package", "room", "allowed"),
    [
        ("app.slack", "app.core", SLACK_MAY_USE_FROM_CORE),
        ("app.agents", "app.slack", AGENTS_MAY_USE_FROM_SLACK),
        ("app.agents", "app.tracking", AGENTS_MAY_USE_FROM_TRACKING),
    ],
)
def test_a_package_takes_only_leaf_modules_from_another(
    package: str, room: str, allowed: tuple[str, ...]
) -> None:
    crossings = [
        f"{where}: {module} imports {target}"
        for module, target, where in IMPORTS
        if _within(module, package)
        and _within(target, room)
        and not any(_within(target, leaf) for leaf in allowed)
        and target != room
    ]
    assert not crossings, "\n".join(crossings)


@pytest.mark.parametrize(
    ("wired", "importers"),
    [
        ("handlers", HANDLERS_IMPORTERS),
        ("app.simulators", SIMULATORS_IMPORTERS),
        ("app.agents", AGENTS_IMPORTERS),
        ("app.ledger_cli", LEDGER_CLI_IMPORTERS),
        ("app.sandbox", SANDBOX_IMPORTERS),
        ("app.main", MAIN_IMPORTERS),
    ],
)
def test_only_their_owners_import_the_wired_rooms(wired: str, importers: tuple[str, ...]) -> None:
    crossings = [
        f"{where}: {module} imports {target}"
        for module, target, where in IMPORTS
        if _within(target, wired) and not any(_within(module, owner) for owner in importers)
    ]
    assert not crossings, "\n".join(crossings)


def test_renderers_do_no_io() -> None:
    crossings = []
    for path in sorted((ROOT / "app" / "slack" / "render").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            crossings += [
                f"{where}: imports {name}"
                for name in names
                if any(_within(name, io) for io in RENDER_MUST_NOT_IMPORT)
            ]
    assert not crossings, "\n".join(crossings)
