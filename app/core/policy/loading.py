"""Loading the policy file: a missing file opens everything, loudly; a malformed one is refused
with one problem a line, each naming the file and the line."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from pydantic import ValidationError

from app.core import yaml_input
from app.core.policy.checks import Policy
from app.core.policy.model import AGENT_PREFIX, PolicyFile

# The package's name, as before it was split in modules: log filters key on it.
log = logging.getLogger(__package__)


class PolicyError(Exception):
    """The policy file cannot be used; the message names the file and line."""


def load_policy(path: str | Path | None) -> Policy:
    """Load the policy file; a missing file gives the open policy, loudly."""
    if path is None or not Path(path).exists():
        log.warning(
            "no policy file%s: everyone may deploy, cancel and rebuild every pipeline from any "
            "channel. Set POLICY_FILE to restrict this.",
            f" at {path}" if path else "",
        )
        return Policy.open_to_everyone()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyError(f"cannot read {path}: {reason}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml_input.load(text) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}" if mark else "an unknown line"
        raise PolicyError(f"{path}, {line}: not valid YAML ({exc.problem})") from None
    except (yaml_input.UnreadableYAML, RecursionError) as exc:
        # A value PyYAML cannot build (a date that is no date), or nesting too deep.
        why = exc.kind if isinstance(exc, yaml_input.UnreadableYAML) else "RecursionError"
        raise PolicyError(f"{path}: not valid YAML ({why})") from None
    if not isinstance(raw, dict):
        raise PolicyError(
            f"{path}, line 1: the policy must be a mapping (admins, default, pipelines)"
        )
    try:
        data = PolicyFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]]
            where = ".".join(loc) or "(top level)"
            message = error["msg"]
            if error["type"] == "value_error":  # our own sentence, without pydantic's tag
                message = message.removeprefix("Value error, ")
            problems.append(f"{path}, line {_line_of(node, loc)}: {where}: {message}")
        raise PolicyError("\n".join(problems)) from None
    if unknown := _unknown_agents(data, node, path):
        raise PolicyError("\n".join(unknown))
    for pattern, rule in data.pipelines.items():
        rule.name = pattern
    log.info("policy loaded from %s: %d pipeline rules", path, len(data.pipelines))
    return Policy(data, source=str(path))


def _unknown_agents(data: PolicyFile, node: yaml.Node | None, path: str | Path) -> list[str]:
    """Rules naming an `agent:<name>` that `agents:` does not declare, one problem a line."""
    problems = []
    rules = [(["default"], data.default)] + [
        (["pipelines", pattern], rule) for pattern, rule in data.pipelines.items()
    ]
    for loc, rule in rules:
        for field in ("deployers", "cancelers", "rebuilders", "unblockers"):
            for index, who in enumerate(getattr(rule, field) or []):
                name = who.removeprefix(AGENT_PREFIX)
                if who.startswith(AGENT_PREFIX) and name not in data.agents:
                    where = [*loc, field, str(index)]
                    problems.append(
                        f"{path}, line {_line_of(node, where)}: {'.'.join(where)}: {who!r} is "
                        "not declared under `agents:`"
                    )
    return problems


def _line_of(node: yaml.Node | None, loc: list[str]) -> int:
    """The 1-based line of the YAML node at `loc` (or of its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
            if match is None:
                key_node = next((k for k, _ in node.value if k.value == key), None)
                return key_node.start_mark.line + 1 if key_node else line
            node = match
        elif (
            isinstance(node, yaml.SequenceNode)
            and key.isascii()
            and key.isdigit()
            and int(key) < len(node.value)
        ):
            node = node.value[int(key)]
        else:
            return line
        line = node.start_mark.line + 1
    return line
