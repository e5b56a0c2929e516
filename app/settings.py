"""The bot's settings, read once at start-up from the environment or a `.env` file.

The environment variable names are the public interface: the README's settings table lists them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Settings(BaseSettings):
    """Every setting of the bot. See the README for what each one does."""

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

    buildkite_api_token: SecretStr
    buildkite_org: str
    buildkite_api_url: AnyHttpUrl = AnyHttpUrl("https://api.buildkite.com/v2")
    buildkite_webhook_token: SecretStr | None = None

    redis_url: str | None = None
    port: Annotated[int, Field(ge=1, le=65535)] = 3000
    log_level: LogLevel = "INFO"

    #: Seconds between two polls of Buildkite for builds whose webhooks did not arrive.
    poll_interval: Annotated[float, Field(gt=0, le=3600)] = 15.0

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

    @field_validator("slack_signing_secret", "buildkite_api_token")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("buildkite_webhook_token")
    @classmethod
    def _blank_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return value

    @field_validator("buildkite_org")
    @classmethod
    def _org_slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError("must be an organization slug, e.g. acme-inc")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def socket_mode(self) -> bool:
        return self.slack_app_token is not None


class SettingsError(Exception):
    """Start-up configuration problems, one line per problem, never showing a secret value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning pydantic's report into one clear line per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            if error["type"] == "missing":
                problems.append(f"{name} is not set")
            else:
                # Only `msg` is shown: it never contains the (possibly secret) input value.
                problems.append(f"{name} is invalid: {error['msg']}")
        raise SettingsError(problems) from None
