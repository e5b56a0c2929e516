"""The bot's settings, read once at start-up from the environment or a `.env` file.

The environment variable names are the public interface: docs/configuration.md lists them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.core import yaml_input
from app.core.names import PIPELINE_SLUG_PATTERN
from app.storage.redis_url import parse_redis_url

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

#: Where Slack hands out every response_url (SLACK_HOOKS_URL's default).
DEFAULT_SLACK_HOOKS_URL = "https://hooks.slack.com/"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

_TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,49}$")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,99}$")


def steps_problem(text: str) -> str | None:
    """Why `text` is not a pipeline's steps YAML (a mapping with a non-empty `steps` list)."""
    try:
        data = yaml_input.load(text)
    except yaml_input.UnreadableYAML as exc:
        if exc.too_deep:
            return "not valid YAML (nested too deeply)"
        return f"not valid YAML at line {exc.line}" if exc.line else "not valid YAML"
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        return "must be YAML with a top-level `steps:` list"
    if not data["steps"]:
        return "`steps:` is empty"
    return None


def _template_source(value: Any) -> Any:
    """PIPELINE_TEMPLATES as data: its JSON, or the YAML file it names."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{text} is neither a JSON object nor an existing YAML file")
    try:
        return yaml_input.load(path.read_text(encoding="utf-8")) or {}
    except yaml_input.UnreadableYAML:
        raise ValueError(f"{text} is not valid YAML") from None


class DigestSchedule(BaseModel):
    """One scheduled build-health digest (DIGEST_SCHEDULES): where, when (UTC) and over what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(pattern=r"^([CG][A-Z0-9]{2,}|#[a-z0-9][a-z0-9._-]{0,79})$")
    #: The time of day, UTC, as HH:MM.
    at: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    window: Literal["24h", "7d"] = "24h"
    #: "all", or a list of pipeline slugs.
    pipelines: Literal["all"] | list[Annotated[str, Field(pattern=PIPELINE_SLUG_PATTERN)]] = "all"
    #: Post weekly on this day instead of daily.
    weekday: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"] | None = None

    @field_validator("pipelines", mode="before")
    @classmethod
    def _one_slug(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) and value != "all" else value

    @property
    def key(self) -> str:
        """A stable id for this schedule, so its Redis records survive a restart."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class Settings(BaseSettings):
    """Every setting of the bot. See docs/configuration.md for what each one does."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    slack_bot_token: SecretStr
    slack_signing_secret: SecretStr
    slack_app_token: SecretStr | None = None
    slack_api_url: AnyHttpUrl = AnyHttpUrl("https://slack.com/api/")
    #: Only response_urls starting with this are posted to (tests point it at their fake).
    slack_hooks_url: str = DEFAULT_SLACK_HOOKS_URL

    buildkite_api_token: SecretStr
    buildkite_org: str
    buildkite_api_url: AnyHttpUrl = AnyHttpUrl("https://api.buildkite.com/v2")
    buildkite_webhook_token: SecretStr | None = None
    #: The cluster new pipelines join on a clustered organization (a template may name its own).
    buildkite_cluster_id: str | None = None
    #: Seconds to wait for one Buildkite answer.
    buildkite_timeout: Annotated[float, Field(gt=0, le=300)] = 15.0
    #: Seconds to look for the build of a create or rebuild that got no answer (it is never
    #: sent again) before telling the person it may have started; the poller keeps looking.
    buildkite_start_patience: Annotated[float, Field(ge=0, le=600)] = 60.0

    redis_url: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 3000
    log_level: LogLevel = "INFO"

    #: Seconds between two polls of Buildkite for builds whose webhooks did not arrive: a final
    #: state missed by its webhook reaches Slack within about this long. Builds still running are
    #: listed less often at scale (see Poller.poll_once).
    poll_interval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    #: The deploy policy (YAML). A missing file means everyone may do everything (logged).
    policy_file: str = "policy.yml"

    @field_validator("slack_bot_token")
    @classmethod
    def _bot_token_shape(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith("xoxb-"):
            raise ValueError("must be a bot token starting with xoxb-")
        return value

    @field_validator("slack_app_token")
    @classmethod
    def _app_token_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if not value.get_secret_value().startswith("xapp-"):
            raise ValueError("must be an app-level token starting with xapp- (or unset for HTTP)")
        return value

    @field_validator(
        "slack_bot_token",
        "slack_signing_secret",
        "buildkite_api_token",
        "buildkite_org",
        mode="before",
    )
    @classmethod
    def _required_not_blank(cls, value: Any) -> Any:
        # `SLACK_BOT_TOKEN=` as in a fresh copy of .env.example: said as empty, not as a
        # malformed token.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and not text.strip():
            raise PydanticCustomError("blank", "is empty")
        return value

    @field_validator("buildkite_webhook_token")
    @classmethod
    def _blank_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    @field_validator("slack_hooks_url")
    @classmethod
    def _hooks_prefix(cls, value: str) -> str:
        value = value.strip() or DEFAULT_SLACK_HOOKS_URL
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError("must be a URL such as https://hooks.slack.com/") from None
        if not parts.hostname or parts.username is not None or parts.query or parts.fragment:
            raise ValueError("must be a URL such as https://hooks.slack.com/ (no user, query or #)")
        if parts.scheme != "https" and not (
            parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS
        ):
            raise ValueError("must be an https:// URL (plain http only for 127.0.0.1 or localhost)")
        # A prefix ending in "/" pins the host: `https://hooks.slack.com.evil.example/` is out.
        return value if value.endswith("/") else value + "/"

    @field_validator("buildkite_org")
    @classmethod
    def _org_slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("must be an organization slug, e.g. acme-inc")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_redis_url(value)  # its ValueError quotes no part of the URL
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def socket_mode(self) -> bool:
        return self.slack_app_token is not None

    #: Templates for `/buildkite pipeline create`: JSON {name: steps YAML}, or a YAML file's path.
    #: A template may instead be a mapping {"steps": ..., "cluster_id": ...}.
    pipeline_templates: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    #: The cluster each template names, taken from PIPELINE_TEMPLATES.
    _template_clusters: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def pipeline_template_clusters(self) -> dict[str, str]:
        """The cluster each pipeline template names (a template without one is absent)."""
        return dict(self._template_clusters)

    #: Scheduled build-health digests, as a JSON list of DigestSchedule objects.
    digest_schedules: Annotated[list[DigestSchedule], NoDecode] = Field(default_factory=list)

    @field_validator("buildkite_cluster_id", mode="before")
    @classmethod
    def _cluster_id(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip() or None
        if value is not None and not (isinstance(value, str) and _CLUSTER_ID.match(value)):
            raise ValueError("must be a cluster id (letters, digits and -)")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _split_template_clusters(
        cls, data: Any, handler: ModelWrapValidatorHandler[Settings]
    ) -> Settings:
        # A template may carry `cluster_id` beside its steps: the cluster is kept apart, so
        # every reader of the steps is unchanged.
        if not isinstance(data, dict):
            return handler(data)
        try:
            templates = _template_source(data.get("pipeline_templates", {}))
        except ValueError:
            return handler(data)  # the field's own validator reports it, under its name
        if not isinstance(templates, dict):
            return handler(data)
        clusters: dict[str, str] = {}
        plain: dict[Any, Any] = {}
        for name, template in templates.items():
            cluster = template.get("cluster_id") if isinstance(template, dict) else None
            # A bad cluster_id stays in its template, for the field's validator to report.
            if isinstance(cluster, str) and _CLUSTER_ID.match(cluster):
                template = dict(template)
                del template["cluster_id"]
                clusters[str(name)] = cluster
                if isinstance(template.get("steps"), str) and len(template) == 1:
                    template = template["steps"]
            plain[name] = template
        settings = handler({**data, "pipeline_templates": plain})
        settings._template_clusters = clusters
        return settings

    @field_validator("pipeline_templates", mode="before")
    @classmethod
    def _load_templates(cls, value: Any) -> Any:
        value = _template_source(value)
        if not isinstance(value, dict):
            raise ValueError("must map template names to steps YAML")
        templates: dict[str, str] = {}
        for name, steps in value.items():
            if not isinstance(name, str) or not _TEMPLATE_NAME.match(name):
                raise ValueError(
                    f"template name {name!r} must be lowercase letters, digits, - or _"
                )
            if isinstance(steps, dict) and "cluster_id" in steps:  # a valid one was split off
                raise ValueError(
                    f"template {name!r}: cluster_id must be a cluster id (letters, digits and -)"
                )
            text = steps if isinstance(steps, str) else yaml.safe_dump(steps, sort_keys=False)
            if problem := steps_problem(text):
                raise ValueError(f"template {name!r}: {problem}")
            templates[name] = text
        return templates

    @field_validator("digest_schedules", mode="before")
    @classmethod
    def _parse_schedules(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg})") from None
        if not isinstance(value, list):
            raise ValueError('must be a JSON list like [{"channel": "C0123", "at": "09:00"}]')
        schedules = []
        problems = []
        for number, item in enumerate(value, start=1):
            try:
                schedules.append(DigestSchedule.model_validate(item))
            except ValidationError as exc:
                for error in exc.errors():
                    line = f"schedule {number}: {_schedule_problem(error)}"
                    if line not in problems:  # `pipelines` fails both sides of its union
                        problems.append(line)
        if problems:
            # One line a problem: load_settings gives each line its own entry.
            raise ValueError("\n".join(problems))
        return schedules


_SCHEDULE_PATTERNS = {
    "channel": "must be a channel id such as C0123 or a name such as #deploys",
    "at": "must be a time of day, UTC, as HH:MM",
}


def _schedule_problem(error: ErrorDetails) -> str:
    """One DIGEST_SCHEDULES problem as `field: what is wrong`, a regex said in words."""
    field = str(error["loc"][0]) if error["loc"] else "schedule"
    if field == "pipelines":
        return 'pipelines: must be "all", or a list of pipeline slugs such as deploy-prod'
    if error["type"] == "string_pattern_mismatch" and field in _SCHEDULE_PATTERNS:
        return f"{field}: {_SCHEDULE_PATTERNS[field]}"
    where = ".".join(str(part) for part in error["loc"]) or "schedule"
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


class PolicyFileSetting(BaseSettings):
    """POLICY_FILE alone, read as Settings reads it: `--check-config` checks the policy file
    even while other settings are missing, e.g. on a laptop without the tokens."""

    model_config = Settings.model_config

    policy_file: str = "policy.yml"


class SettingsError(Exception):
    """Start-up configuration problems, one line per problem, never showing a secret value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning pydantic's report into one clear line per bad variable."""
    try:
        return Settings(**overrides)
    except UnicodeDecodeError as exc:  # python-dotenv reading .env; the bytes are not shown
        line = exc.object[: exc.start].count(b"\n") + 1
        raise SettingsError(
            [f".env, line {line}: not UTF-8 text; save the file as UTF-8"]
        ) from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            if error["type"] == "missing":
                problems.append(f"{name} is not set")
            elif error["type"] == "blank":
                problems.append(f"{name} is empty")
            else:
                # Only `msg` is shown: it never contains the (possibly secret) input value.
                message = error["msg"]
                if error["type"] == "value_error":  # our own sentence, without pydantic's tag
                    message = message.removeprefix("Value error, ")
                # A validator that finds several problems says them one a line.
                problems.extend(f"{name} is invalid: {line}" for line in message.splitlines())
        raise SettingsError(problems) from None
