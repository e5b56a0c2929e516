"""The policy file's model: its rules, approvals, notification routes and unblock forms, each
validated with a sentence that says what is wrong."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator

from app.core.freezes import Freeze
from app.core.names import PIPELINE_SLUG
from app.core.policy.env import EnvRule
from app.core.unblock_forms import BlockForm, FormError, FormField, parse_field

_USER = re.compile(r"^[UW][A-Z0-9]{2,}$")
_GROUP = re.compile(r"^S[A-Z0-9]{2,}$")
_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
_CHANNEL_NAME = re.compile(r"^#[a-z0-9][a-z0-9._-]{0,79}$")
_DURATION = re.compile(r"^(\d+)([smhd])$")
#: An agent's name in the policy (`agents:`), and how rules name it: `agent:<name>`.
AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
AGENT_PREFIX = "agent:"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def is_agent(principal: str) -> bool:
    """An agent (`agent:<name>`), which is never a Slack user: it is only what a rule names."""
    return principal.startswith(AGENT_PREFIX)


def is_group(principal: str) -> bool:
    """A Slack user group id (S…), whose members are looked up, rather than a user id."""
    return bool(_GROUP.match(principal))


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
    """People only: Slack user ids and user group ids (admins, approvers, agent stoppers)."""
    if values is None:
        return None
    for value in values:
        if is_agent(value):
            raise ValueError(f"{value!r} is an agent: only people may be named here")
        if not (_USER.match(value) or is_group(value)):
            raise ValueError(
                f"{value!r} is neither a Slack user id (U…/W…) nor a user group id (S…)"
            )
    return values


def _check_grantees(values: list[str] | None) -> list[str] | None:
    """Who a rule lets act: people, user groups, or agents (`agent:<name>`)."""
    if values is None:
        return None
    for value in values:
        if is_agent(value):
            if not AGENT_NAME.match(value.removeprefix(AGENT_PREFIX)):
                raise ValueError(
                    f"{value!r} is not an agent's name: use agent:<name>, with lowercase "
                    "letters, digits, dashes and underscores"
                )
        elif not (_USER.match(value) or is_group(value)):
            raise ValueError(
                f"{value!r} is neither a Slack user id (U…/W…), a user group id (S…) nor an "
                "agent (agent:<name>)"
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


class Superseded(StrEnum):
    """What unblocking a build superseded by a newer one of its branch does (see supersede)."""

    #: Refused, with a link to the newer build.
    REFUSE = "refuse"
    #: Allowed once the person confirms it.
    WARN = "warn"
    #: The bot cancels the superseded build itself.
    CANCEL = "cancel"


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
    #: Its pipelines' (and branches') builds are deployments: the release ledger keeps them.
    deploy: bool = False

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
    #: Deploys only commits that passed a deployment of this pipeline (see app.core.releases).
    promote_from: str | None = None
    #: A blocked build superseded by a newer one of its branch: refuse, warn or cancel.
    superseded: Superseded = Superseded.REFUSE

    _principals = field_validator("deployers", "cancelers", "rebuilders", "unblockers")(
        _check_grantees
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if not (_CHANNEL_ID.match(value) or _CHANNEL_NAME.match(value)):
                raise ValueError(f"{value!r} is neither a channel id (C…) nor a #channel-name")
        return values

    @field_validator("promote_from")
    @classmethod
    def _promote_from(cls, value: str | None) -> str | None:
        if value is not None and not PIPELINE_SLUG.match(value):
            raise ValueError(f"{value!r} is not a pipeline slug")
        return value

    @property
    def asks_first(self) -> bool:
        """A deploy (or rebuild) must be confirmed first: the rule protects it or wants approval."""
        return self.protected or self.approval is not None

    def env_refusal(self, env: Mapping[str, str]) -> str | None:
        """Why this env may not be sent (naming the variable and the rule), or None."""
        return self.env.refusal(env, rule=self.name)

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


class AgentBudget(BaseModel):
    """What one agent may spend: mutations an hour, reads a minute (enforced across replicas)."""

    model_config = ConfigDict(extra="forbid")

    mutations_per_hour: int = Field(default=20, ge=0, le=10_000)
    reads_per_minute: int = Field(default=60, ge=0, le=10_000)


class AgentSpec(BaseModel):
    """An MCP client the bot lets act (see app.agents): denied everything a rule does not grant
    to `agent:<name>`, and never more than the person it `acts_for`."""

    model_config = ConfigDict(extra="forbid")

    #: sha256 (hex) of the agent's bearer token: the token itself is never stored.
    token_sha256: str
    acts_for: str | None = None
    budget: AgentBudget = Field(default_factory=AgentBudget)
    #: Where its build messages and approval requests are posted, and what channel rules see
    #: (by default the pipeline rule's first channel).
    channel: str | None = None

    @field_validator("token_sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _SHA256.match(value.strip().lower()):
            raise ValueError(
                "token_sha256 must be the 64 hex characters of the token's sha256 (for example "
                '`printf %s "$TOKEN" | sha256sum`), never the token itself'
            )
        return value.strip().lower()

    @field_validator("acts_for")
    @classmethod
    def _person(cls, value: str | None) -> str | None:
        if value is not None and not _USER.match(value):
            raise ValueError(f"{value!r} is not a Slack user id (U…/W…)")
        return value

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str | None) -> str | None:
        if value is not None and not _CHANNEL_ID.match(value):
            raise ValueError(
                f"{value!r} is not a channel id (C…): find it in the channel's details"
            )
        return value


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
    #: When deploys of matching pipelines are refused (see app.core.freezes).
    freezes: list[Freeze] = Field(default_factory=list)
    #: A lock held this long reminds its holder by DM, and again every such period after.
    lock_reminder_after: int = Field(default=4 * 3600, ge=60)
    #: MCP clients by name, granted rights by rules naming `agent:<name>` (see app.agents).
    agents: dict[str, AgentSpec] = Field(default_factory=dict)

    _principals = field_validator("admins", "agent_stoppers")(_check_principals)

    @field_validator("agents")
    @classmethod
    def _agent_names(cls, agents: dict[str, AgentSpec]) -> dict[str, AgentSpec]:
        for name in agents:
            if not AGENT_NAME.match(name):
                raise ValueError(
                    f"{name!r} is not an agent's name: use lowercase letters, digits, dashes "
                    "and underscores (at most 63)"
                )
        digests = [a.token_sha256 for a in agents.values()]
        if len(set(digests)) != len(digests):
            raise ValueError("two agents have the same token_sha256: give each its own token")
        return agents

    @field_validator("usergroup_cache_ttl", "lock_reminder_after", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value
