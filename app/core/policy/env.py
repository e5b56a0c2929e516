"""Which environment variables a deploy may carry: the built-in deny list, a rule's env globs,
and the sentence that refuses a variable, naming it and the rule."""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.slack.mrkdwn import code

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

    def refusal(self, env: Mapping[str, str], *, rule: str) -> str | None:
        """Why this env may not be sent (naming the variable and the rule `rule`), or None."""
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
            denied = next((p for p in self.deny if _env_glob(name, p)), None)
            if denied is not None:
                return f"`{name}` is refused by policy rule {code(rule)} (env deny `{denied}`)."
            allow = self.allow
            if allow is not None and not any(_env_glob(name, p) for p in allow):
                listed = ", ".join(f"`{p}`" for p in allow) or "nothing"
                return (
                    f"`{name}` is not allowed by policy rule {code(rule)}: its env allow list "
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
