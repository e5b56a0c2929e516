"""Who may do what to which pipeline, from where: the deploy policy file and its checks.

The policy is a YAML file (path in POLICY_FILE). Rules are matched by exact pipeline slug first,
then by glob in file order, then the default rule. A missing file means "everyone may do
everything", said loudly in the log; a malformed file stops start-up naming the line.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
)

from app.core import yaml_input
from app.core.unblock_forms import BlockForm, FormError, FormField, match_step, parse_field

log = logging.getLogger(__name__)

_USER = re.compile(r"^[UW][A-Z0-9]{2,}$")
_GROUP = re.compile(r"^S[A-Z0-9]{2,}$")
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
_CHANNEL_NAME = re.compile(r"^#[a-z0-9][a-z0-9._-]{0,79}$")
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Action(StrEnum):
    """The mutations (and views) the policy rules on."""

    DEPLOY = "deploy"
    CANCEL = "cancel"
    REBUILD = "rebuild"
    UNBLOCK = "unblock"
    LOCK = "lock"
    AUDIT = "audit"


def parse_duration(value: str | int) -> int:
    """Seconds from `90`, `90s`, `30m`, `2h` or `1d`."""
    if isinstance(value, int):
        return value
    match = _DURATION.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30m, 2h or 1d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def _check_principals(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    for value in values:
        if not (_USER.match(value) or _GROUP.match(value)):
            raise ValueError(
                f"{value!r} is neither a Slack user id (U…/W…) nor a user group id (S…)"
            )
    return values


Principals = Annotated[list[str] | None, Field(default=None)]


class Approval(BaseModel):
    """A second person from `approvers` must approve each deploy of the pipeline."""

    model_config = ConfigDict(extra="forbid")

    approvers: list[str] = Field(min_length=1)
    expires_after: int = 1800

    _principals = field_validator("approvers")(_check_principals)

    @field_validator("expires_after", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class AutoRetry(BaseModel):
    """Retry a failed build's failed jobs automatically, within bounds."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(default=1, ge=1, le=5)
    hourly_budget: int = Field(default=10, ge=1, le=1000)


class NotifyEvent(StrEnum):
    """What a notification route announces."""

    STARTED = "started"
    FAILED = "failed"
    FIRST_FAILURE = "first_failure"
    FIXED = "fixed"
    BLOCKED = "blocked"
    PASSED = "passed"
    DEFAULT_BRANCH = "default_branch"


#: The noise-controlled default: failures, blocks, transitions, and default-branch builds.
DEFAULT_EVENTS = (
    NotifyEvent.FAILED,
    NotifyEvent.BLOCKED,
    NotifyEvent.FIRST_FAILURE,
    NotifyEvent.FIXED,
    NotifyEvent.DEFAULT_BRANCH,
)


class Route(BaseModel):
    """Announce builds of these pipelines (slugs or globs) and branches in a channel."""

    model_config = ConfigDict(extra="forbid")

    pipelines: list[str] = Field(min_length=1)
    branches: list[str] | None = None
    channel: str
    events: list[NotifyEvent] = Field(default_factory=lambda: list(DEFAULT_EVENTS))

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        if not _CHANNEL_ID.match(value):
            raise ValueError(
                f"{value!r} is not a channel id (C…): find it in the channel's details"
            )
        return value

    def matches(self, pipeline: str, branch: str | None) -> bool:
        if not any(fnmatch.fnmatchcase(pipeline, p) for p in self.pipelines):
            return False
        if self.branches is None:
            return True
        return branch is not None and any(fnmatch.fnmatchcase(branch, b) for b in self.branches)

    @property
    def name(self) -> str:
        return f"{','.join(self.pipelines)} -> {self.channel}"


#: What a deploy may carry, so that the confirmation and the approval can show all of it.
MAX_ENV_VARS = 20
MAX_ENV_NAME = 64
MAX_ENV_VALUE = 200

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_PATTERN = re.compile(r"^[A-Za-z0-9_*?\[\]!-]{1,64}$")

#: Names refused on every pipeline, whatever a rule allows: they change how an agent runs code
#: (loaders, shells, interpreters, git) or touch Buildkite's own settings and secrets.
BUILT_IN_ENV_DENY = (
    "BUILDKITE_*",
    "LD_*",
    "DYLD_*",
    "PATH",
    "BASH_ENV",
    "ENV",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "NODE_OPTIONS",
    "GIT_SSH_COMMAND",
    "GIT_CONFIG*",
    "PERL5OPT",
    "RUBYOPT",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "IFS",
)

#: Unicode categories refused in values: controls (ESC, newlines), invisible format characters
#: (bidi overrides, zero-width) and separators that would make the shown value differ from it.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _env_glob(name: str, pattern: str) -> bool:
    # Case-insensitive: Windows agents treat `Path` and `PATH` as the same variable.
    return fnmatch.fnmatchcase(name.upper(), pattern.upper())


class EnvRule(BaseModel):
    """Which env variable names a deploy may set: globs, matched case-insensitively.

    `deny` refuses matching names; `allow`, when given, refuses every name it does not match.
    The built-in list (`BUILT_IN_ENV_DENY`) is refused first and cannot be allowed.
    """

    model_config = ConfigDict(extra="forbid")

    allow: list[str] | None = None
    deny: list[str] = Field(default_factory=list)

    @field_validator("allow", "deny")
    @classmethod
    def _patterns(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if not _ENV_PATTERN.match(value):
                raise ValueError(
                    f"{value!r} is not an env name pattern (letters, digits, _ and the globs "
                    "* ? [...], at most 64 characters)"
                )
        return values


class Rule(BaseModel):
    """What one pipeline rule allows. A list left out means everyone; `[]` means nobody."""

    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    channels: list[str] | None = None
    deployers: Principals = None
    cancelers: Principals = None
    rebuilders: Principals = None
    unblockers: Principals = None
    protected: bool = False
    approval: Approval | None = None
    auto_retry: AutoRetry | None = None
    env: EnvRule = Field(default_factory=EnvRule)

    _principals = field_validator("deployers", "cancelers", "rebuilders", "unblockers")(
        _check_principals
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if not (_CHANNEL_ID.match(value) or _CHANNEL_NAME.match(value)):
                raise ValueError(f"{value!r} is neither a channel id (C…) nor a #channel-name")
        return values

    @property
    def asks_first(self) -> bool:
        """A deploy (or rebuild) must be confirmed first: the rule protects it or wants approval."""
        return self.protected or self.approval is not None

    def env_refusal(self, env: Mapping[str, str]) -> str | None:
        """Why this env may not be sent (naming the variable and the rule), or None."""
        if len(env) > MAX_ENV_VARS:
            return (
                f"{len(env)} environment variables is more than the {MAX_ENV_VARS} a deploy may "
                "set (so that the confirmation and the approval can show them all)."
            )
        for name, value in env.items():
            if not ENV_NAME.match(name) or len(name) > MAX_ENV_NAME:
                shown = re.sub(r"[^A-Za-z0-9_]", "?", name[:MAX_ENV_NAME])
                return (
                    f"`{shown}` is not a valid environment variable name: letters, digits and _, "
                    f"not starting with a digit, at most {MAX_ENV_NAME} characters."
                )
            builtin = next((p for p in BUILT_IN_ENV_DENY if _env_glob(name, p)), None)
            if builtin is not None:
                return (
                    f"`{name}` may not be set from Slack: it changes how the agent runs code or "
                    f"touches Buildkite's own settings (built-in rule `{builtin}`)."
                )
            denied = next((p for p in self.env.deny if _env_glob(name, p)), None)
            if denied is not None:
                return f"`{name}` is refused by policy rule `{self.name}` (env deny `{denied}`)."
            allow = self.env.allow
            if allow is not None and not any(_env_glob(name, p) for p in allow):
                listed = ", ".join(f"`{p}`" for p in allow) or "nothing"
                return (
                    f"`{name}` is not allowed by policy rule `{self.name}`: its env allow list "
                    f"has {listed}."
                )
            if len(value) > MAX_ENV_VALUE:
                return (
                    f"The value of `{name}` is {len(value)} characters long; at most "
                    f"{MAX_ENV_VALUE} can be shown in full to whoever confirms or approves it."
                )
            hidden = next((c for c in value if unicodedata.category(c) in _HIDDEN_CATEGORIES), None)
            if hidden is not None:
                return (
                    f"The value of `{name}` contains a control or invisible character "
                    f"(U+{ord(hidden):04X}), which would not show as it is sent."
                )
        return None

    def allowed(self, action: Action) -> list[str] | None:
        """Who may do `action` (None: everyone). Cancel, rebuild, unblock default to deployers."""
        own = {
            Action.DEPLOY: self.deployers,
            Action.CANCEL: self.cancelers,
            Action.REBUILD: self.rebuilders,
            Action.UNBLOCK: self.unblockers,
            Action.LOCK: None,
            Action.AUDIT: None,
        }[action]
        return own if own is not None else self.deployers


def _policy_field(raw: Any) -> FormField:
    try:
        return parse_field(raw, strict=True)
    except FormError as exc:
        raise ValueError(str(exc)) from None


class UnblockFormSpec(BaseModel):
    """The form of one block step the pipeline's own steps do not describe (uploaded steps)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    fields: list[Annotated[FormField, PlainValidator(_policy_field)]] = Field(max_length=98)

    @field_validator("fields")
    @classmethod
    def _unique_keys(cls, fields: list[FormField]) -> list[FormField]:
        keys = [f.key for f in fields]
        if duplicate := next((k for k in keys if keys.count(k) > 1), None):
            raise ValueError(f"the key `{duplicate}` is used by two fields")
        return fields

    def form(self) -> BlockForm:
        return BlockForm(
            fields=tuple(self.fields), prompt=self.prompt, source="the policy's unblock_forms"
        )


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    admins: list[str] = Field(default_factory=list)
    default: Rule = Field(default_factory=Rule)
    pipelines: dict[str, Rule] = Field(default_factory=dict)
    #: Channel notifications for builds, whoever started them.
    notifications: list[Route] = Field(default_factory=list)
    #: How long Slack user-group memberships are cached.
    usergroup_cache_ttl: int = 300
    #: Who may stop Buildkite agents from Slack, besides the admins (None: only admins).
    agent_stoppers: Principals = None
    #: Block step forms by pipeline (slug or glob), then step key or label.
    unblock_forms: dict[str, dict[str, UnblockFormSpec]] = Field(default_factory=dict)

    _principals = field_validator("admins", "agent_stoppers")(_check_principals)

    @field_validator("usergroup_cache_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value


class PolicyError(Exception):
    """The policy file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str = ""


#: Resolves a Slack user group id to its members' user ids.
GroupResolver = Callable[[str], Awaitable[list[str]]]


class Policy:
    """The loaded policy, with the checks every mutation goes through."""

    def __init__(self, data: PolicyFile, *, source: str) -> None:
        self.data = data
        self.source = source
        self._groups: dict[str, tuple[float, frozenset[str]]] = {}
        self._clock = time.monotonic

    @classmethod
    def open_to_everyone(cls) -> Policy:
        return cls(PolicyFile(), source="(no policy file)")

    @property
    def admins(self) -> list[str]:
        return self.data.admins

    def routes_for(self, pipeline: str, branch: str | None) -> list[Route]:
        return [r for r in self.data.notifications if r.matches(pipeline, branch)]

    def unblock_form(
        self, pipeline: str, *, step_key: str | None, label: str | None
    ) -> BlockForm | None:
        """The policy's form for a block step: its pipeline by slug then glob, then the step by
        key, then by label (exactly, then without emoji and case)."""
        forms = self.data.unblock_forms
        steps = forms.get(pipeline)
        if steps is None:
            steps = next(
                (
                    s
                    for pattern, s in forms.items()
                    if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(pipeline, pattern)
                ),
                None,
            )
        if not steps:
            return None
        # An entry's name is a step key or a label: offered as both, the key wins.
        candidates = [(name, name, spec) for name, spec in steps.items()]
        spec = match_step(candidates, step_key=step_key, label=label)
        if spec is None and step_key:
            spec = match_step(
                [(name, None, s) for name, s in steps.items()], step_key=None, label=label
            )
        return spec.form() if isinstance(spec, UnblockFormSpec) else None

    def rule_for(self, pipeline: str) -> Rule:
        rules = self.data.pipelines
        if pipeline in rules:
            return rules[pipeline]
        for pattern, rule in rules.items():
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(pipeline, pattern):
                return rule
        return self.data.default

    async def members(self, principals: Iterable[str], resolve: GroupResolver) -> set[str]:
        """User ids named directly or through user groups (cached for usergroup_cache_ttl)."""
        users: set[str] = set()
        for principal in principals:
            if _GROUP.match(principal):
                users |= await self._group(principal, resolve)
            else:
                users.add(principal)
        return users

    async def _group(self, group: str, resolve: GroupResolver) -> frozenset[str]:
        cached = self._groups.get(group)
        if cached and cached[0] > self._clock():
            return cached[1]
        try:
            members = frozenset(await resolve(group))
        except Exception as exc:  # a lookup failure refuses, it never allows
            log.warning("could not resolve user group %s: %s", group, exc)
            return cached[1] if cached else frozenset()
        self._groups[group] = (self._clock() + self.data.usergroup_cache_ttl, members)
        return members

    async def is_admin(self, user: str, resolve: GroupResolver) -> bool:
        return user in await self.members(self.data.admins, resolve)

    async def check(
        self,
        action: Action,
        pipeline: str,
        *,
        user: str,
        channel_id: str,
        channel_name: str | None,
        resolve: GroupResolver,
    ) -> Decision:
        """May `user` do `action` on `pipeline` from this channel? Admins may do anything."""
        rule = self.rule_for(pipeline)
        if await self.is_admin(user, resolve):
            return Decision(True, rule.name)
        if rule.channels is not None and not _in_channels(rule.channels, channel_id, channel_name):
            where = ", ".join(_channel_ref(c) for c in rule.channels) or "no channel"
            return Decision(
                False,
                rule.name,
                f"`{pipeline}` may only be driven from {where} (policy rule `{rule.name}`).",
            )
        allowed = rule.allowed(action)
        if allowed is None or user in await self.members(allowed, resolve):
            return Decision(True, rule.name)
        who = ", ".join(_principal_ref(p) for p in [*allowed, *self.data.admins]) or "nobody"
        return Decision(
            False,
            rule.name,
            f"You may not {action.value} `{pipeline}`: policy rule `{rule.name}` allows it to "
            f"{who}.",
        )


def _in_channels(channels: list[str], channel_id: str, channel_name: str | None) -> bool:
    return channel_id in channels or (channel_name is not None and f"#{channel_name}" in channels)


def _channel_ref(channel: str) -> str:
    return channel if channel.startswith("#") else f"<#{channel}>"


def principal_ref(principal: str) -> str:
    return f"<!subteam^{principal}>" if _GROUP.match(principal) else f"<@{principal}>"


_principal_ref = principal_ref


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
    for pattern, rule in data.pipelines.items():
        rule.name = pattern
    log.info("policy loaded from %s: %d pipeline rules", path, len(data.pipelines))
    return Policy(data, source=str(path))


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
        elif isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]
        else:
            return line
        line = node.start_mark.line + 1
    return line
