"""Every path by which the bot starts a build honours the freeze.

Found by reading the code, so that a new caller of Buildkite's create, rebuild or retry that
skips the freeze check fails here: each such call sits in a function that checks the freeze
itself, or that only functions checking it call (the deploy, the confirmation, the approval's
re-check). Then, end to end, each Slack surface that starts a build (buttons, thread commands,
slash commands, rollback, promotion) is refused in a freeze and sends Buildkite nothing."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.clocks import Clock
from tests.test_mentions import CHANNEL, deploy, ephemeral_texts, mention, move

ROOT = Path(__file__).resolve().parent.parent
#: The Buildkite client's calls that start a build, or start its jobs again.
STARTS = frozenset({"create_build", "rebuild_build", "retry_failed_jobs", "retry_job"})
#: A function that does one of these checks the freeze in force (see app.core.actions).
CHECKS = frozenset({"_authorize", "freeze_refusal", "_recheck", "_check_freeze"})
#: The functions that start builds today, as reviewed (module, function).
REVIEWED = {
    ("app/core/actions.py", "_start"),
    ("app/core/build_actions.py", "rebuild"),
    ("app/core/build_actions.py", "retry_failed"),
    ("app/core/auto_retry.py", "retry"),
}


def _sources() -> dict[str, ast.Module]:
    trees = {}
    for folder in ("app", "handlers"):
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith("app/simulators/"):
                continue  # the fake Buildkite itself
            trees[relative] = ast.parse(path.read_text(encoding="utf-8"))
    return trees


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _called(function: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
            elif isinstance(node.func, ast.Name):
                names.add(node.func.id)
    return names


def _is_actions(tree: ast.Module, name: str) -> bool:
    """A module of the core's mutations (a subclass of Actions), where `_start` is
    Actions._start and not some other class's method of that name."""
    if not name.startswith("_"):
        return True
    return any(
        isinstance(node, ast.ClassDef)
        and any(isinstance(b, ast.Name) and b.id.endswith("Actions") for b in node.bases)
        for node in ast.walk(tree)
    ) or any(isinstance(n, ast.ClassDef) and n.name == "Actions" for n in ast.walk(tree))


def test_every_call_that_starts_a_build_is_behind_a_freeze_check() -> None:
    trees = _sources()
    starting = {
        (module, function.name)
        for module, tree in trees.items()
        for function in _functions(tree)
        if _called(function) & STARTS
    }
    assert starting == REVIEWED, "a new path starts builds: check it honours freezes, then list it"
    for module, name in sorted(starting):
        (function,) = [f for f in _functions(trees[module]) if f.name == name]
        if _called(function) & CHECKS:
            continue
        callers = [
            (caller_module, caller.name)
            for caller_module, tree in trees.items()
            for caller in _functions(tree)
            if name in _called(caller) and caller.name != name and _is_actions(tree, name)
        ]
        assert callers, f"{module}:{name} starts builds and checks no freeze"
        for caller_module, caller in callers:
            (body,) = [f for f in _functions(trees[caller_module]) if f.name == caller]
            assert _called(body) & CHECKS, f"{caller_module}:{caller} starts a build unchecked"


# -- end to end: each Slack surface that starts a build, during a freeze ------------------------

POLICY = """\
default:
  deployers: [U0USER, U0BOB]
pipelines:
  web:
    promote_from: staging
freezes:
  - pipelines: ["*"]
    from: 2026-12-01T10:00
    to: 2026-12-01T12:00
    reason: release freeze
"""


BEFORE = dt.datetime(2026, 12, 1, 9, tzinfo=dt.UTC).timestamp()
DURING = dt.datetime(2026, 12, 1, 11, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(BEFORE)


@pytest.fixture
async def bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
    clock: Clock,
) -> AsyncIterator[BotClient]:
    bk.add_pipeline("web", steps=("Test", "Deploy"))
    bk.add_pipeline("staging", steps=("Test",))
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(policy)) as client:
        yield client


def said_to_alice(slack: FakeSlack) -> str:
    """Everything the bot told the person: command answers, ephemerals, thread replies."""
    texts = [json.dumps(p.json) for p in slack.responses]
    texts += ephemeral_texts(slack)
    texts += [str(p.args.get("text")) for p in slack.posts(CHANNEL)]
    return "\n".join(texts)


async def test_every_surface_that_starts_a_build_is_refused_in_a_freeze(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, clock: Clock
) -> None:
    root = await deploy(bot, "staging")
    await move(bot, "staging", "failed", failed_jobs=["Test"])
    rebuild = await slack.wait_for(lambda: _button(slack, root, "build_rebuild"))
    retry = await slack.wait_for(lambda: _button(slack, root, "build_retry_failed"))
    clock.now = DURING
    starts_before = len(bk.requests_to("POST"))

    async def refused(step: Callable[[], Awaitable[object]]) -> None:
        before = said_to_alice(slack).count("is frozen: `release freeze`")
        await step()
        await slack.wait_for(
            lambda: said_to_alice(slack).count("is frozen: `release freeze`") > before
        )

    for action, value in (("build_rebuild", rebuild), ("build_retry_failed", retry)):
        await refused(partial(bot.click, action, value, channel=CHANNEL, message_ts=root))
    for words in ("rebuild", "retry"):
        await refused(partial(mention, bot, words, thread_ts=root))
    for text in ("rollback staging", "promote web", "staging", "web main"):
        await refused(partial(bot.command, "/deploy", text))
    await refused(lambda: bot.command("/rebuild", "staging 1"))
    assert len(bk.requests_to("POST")) == starts_before
    assert [r for r in bk.requests_to("PUT") if "/rebuild" in r.path or "/retry" in r.path] == []


def _button(slack: FakeSlack, ts: str, action_id: str) -> str | None:
    for block in slack.message(CHANNEL, ts)["blocks"]:
        for item in block.get("elements", []):
            if item.get("action_id") == action_id:
                return str(item["value"])
    return None
