"""Parsing of what people type after a slash command: pure functions from text to typed requests.

Nothing here calls Slack, Buildkite or Redis, so every rule is cheap to test and a typo is
answered before the command is even acknowledged.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from app.core.names import PIPELINE_SLUG
from app.slack.mrkdwn import typed

COMMIT = re.compile(r"^(HEAD|[0-9a-fA-F]{7,40})$")
_HEXISH = re.compile(r"^[0-9a-fA-F]+$")
ENV_WORD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,127})=(.*)$")
BUILD_URL = re.compile(
    r"^https?://buildkite\.com/(?P<org>[A-Za-z0-9][A-Za-z0-9_-]*)/(?P<pipeline>[^/\s#?]+)"
    r"/builds/(?P<number>\d+)(?:[/#?].*)?$"
)
# git check-ref-format, minus what cannot be typed in Slack anyway.
_BAD_REF = re.compile(r"(\.\.|@\{|[\x00-\x20\x7f~^:?*\[\\]|//|^[-/.]|[/.]$|\.lock$|/\.)")
MAX_MESSAGE = 1000


class UsageError(ValueError):
    """What the person typed cannot be a valid request; the text says why and how to fix it."""


@dataclass(frozen=True)
class HelpRequest:
    """The person asked for help (or typed nothing)."""


@dataclass(frozen=True)
class DeployRequest:
    pipeline: str
    branch: str | None = None
    commit: str = "HEAD"
    message: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: The reason given with `--break-glass`: deploy through a freeze, once a second person
    #: approves.
    break_glass: str | None = None


@dataclass(frozen=True)
class FreezesRequest:
    """List the freezes in force and coming."""


@dataclass(frozen=True)
class LockRequest:
    pipeline: str
    reason: str = ""
    ttl: int | None = None


@dataclass(frozen=True)
class UnlockRequest:
    pipeline: str


@dataclass(frozen=True)
class LocksRequest:
    """List the locked pipelines."""


@dataclass(frozen=True)
class AuditRequest:
    pipeline: str | None = None


DeployCommand = (
    DeployRequest
    | HelpRequest
    | LockRequest
    | UnlockRequest
    | LocksRequest
    | AuditRequest
    | FreezesRequest
)

_DURATION = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class BuildRef:
    """A build named by pipeline and number, as typed or pasted (URL)."""

    pipeline: str
    number: int


DEPLOY_USAGE = (
    "*Usage:* `/deploy <pipeline> [branch] [commit] [message…] [KEY=value…]`\n"
    "• the branch defaults to the pipeline's default branch, the commit to `HEAD`\n"
    "• `KEY=value` words become environment variables of the build\n"
    "• `/deploy lock <pipeline> [30m|2h|1d] [reason…]`, `/deploy unlock <pipeline>`, "
    "`/deploy locks`: stop others deploying a pipeline for a while\n"
    "• `/deploy audit [pipeline]`: the last deploys, cancels, rebuilds and refusals\n"
    "• `/deploy freezes`: the freezes in force and coming; during one, "
    "`/deploy <pipeline> … --break-glass <reason>` asks a second person to approve the deploy\n"
    "*Examples:*\n"
    "• `/deploy deploy-prod`\n"
    "• `/deploy deploy-prod main abc1234 Manual deploy from Slack`\n"
    "• `/deploy web release/2.4 HEAD Hotfix DRY_RUN=1`\n"
    "• `/deploy lock deploy-prod 2h release freeze`"
)
CANCEL_USAGE = (
    "*Usage:* `/cancel <pipeline> <build number>` or `/cancel <build URL>`\n"
    "*Examples:*\n"
    "• `/cancel deploy-prod 1234`\n"
    "• `/cancel https://buildkite.com/acme/deploy-prod/builds/1234`"
)
REBUILD_USAGE = (
    "*Usage:* `/rebuild <pipeline> <build number>` or `/rebuild <build URL>`\n"
    "*Examples:*\n"
    "• `/rebuild deploy-prod 1234`\n"
    "• `/rebuild https://buildkite.com/acme/deploy-prod/builds/1234`"
)


def split_words(text: str) -> list[str]:
    """The words of a command's text, as the person typed them."""
    # Slack wraps a pasted URL as <url> or <url|label>, and escapes &, < and > that people type:
    # unwrap first, then unescape, so that a typed "<!channel>" stays those characters.
    words = []
    for word in (text or "").split():
        if word.startswith("<") and word.endswith(">"):
            word = word[1:-1].split("|", 1)[0]
        words.append(html.unescape(word))
    return words


def is_help(words: list[str]) -> bool:
    return not words or words[0].lower() in {"help", "-h", "--help", "?"}


def check_pipeline(slug: str) -> str:
    if not PIPELINE_SLUG.match(slug):
        raise UsageError(
            f"`{typed(slug)}` is not a pipeline slug: use lowercase letters, digits and dashes, "
            "as in the pipeline's Buildkite URL (e.g. `deploy-prod`)."
        )
    return slug


def check_branch(branch: str) -> str:
    if len(branch) > 255 or _BAD_REF.search(branch):
        raise UsageError(
            f"`{typed(branch)}` is not a valid branch name (see `git check-ref-format`)."
        )
    return branch


def parse_deploy(text: str) -> DeployCommand:
    """Parse `/deploy <pipeline> [branch] [commit] [message…]` with KEY=value words anywhere,
    or one of its subcommands: lock, unlock, locks, freezes, audit (the release subcommands,
    status, history, rollback and promote, are parsed by app.core.commands.releases)."""
    words = split_words(text)
    if is_help(words):
        return HelpRequest()
    sub = words[0].lower()
    if sub == "locks":
        return LocksRequest()
    if sub == "freezes":
        if len(words) > 1:
            raise UsageError("Usage: `/deploy freezes`")
        return FreezesRequest()
    if sub == "audit":
        if len(words) > 2:
            raise UsageError("Usage: `/deploy audit [pipeline]`")
        return AuditRequest(check_pipeline(words[1]) if len(words) == 2 else None)
    if sub == "unlock":
        if len(words) != 2:
            raise UsageError("Usage: `/deploy unlock <pipeline>`")
        return UnlockRequest(check_pipeline(words[1]))
    if sub == "lock":
        if len(words) < 2:
            raise UsageError("Usage: `/deploy lock <pipeline> [30m|2h|1d] [reason…]`")
        pipeline = check_pipeline(words[1])
        words = words[2:]
        ttl = None
        duration = _DURATION.match(words[0]) if words else None
        if duration:
            ttl = int(duration.group(1)) * _UNITS[duration.group(2)]
            words = words[1:]
        reason = " ".join(words)
        if len(reason) > 300:
            raise UsageError("The lock reason is too long (at most 300 characters).")
        return LockRequest(pipeline, reason, ttl)
    pipeline = check_pipeline(words[0])
    words, break_glass = split_break_glass(words)
    env: dict[str, str] = {}
    rest: list[str] = []
    for word in words[1:]:
        match = ENV_WORD.match(word)
        if match:
            env[match.group(1)] = match.group(2)
        else:
            rest.append(word)

    branch = check_branch(rest.pop(0)) if rest else None
    commit = "HEAD"
    if rest:
        candidate = rest[0]
        if COMMIT.match(candidate):
            commit = rest.pop(0)
        elif _looks_like_commit(candidate):
            raise UsageError(
                f"`{typed(candidate)}` is not a commit: use `HEAD` or 7 to 40 hex characters."
            )
    message = " ".join(rest) or None
    if message and len(message) > MAX_MESSAGE:
        raise UsageError(f"The message is too long ({len(message)} characters, at most 1000).")
    return DeployRequest(
        pipeline=pipeline,
        branch=branch,
        commit=commit,
        message=message,
        env=env,
        break_glass=break_glass,
    )


#: `--break-glass` as typed, and as a client's smart punctuation may turn it (an en or em dash).
_BREAK_GLASS_FLAGS = frozenset({"--break-glass", "\u2014break-glass", "\u2013break-glass"})
MAX_BREAK_GLASS_REASON = 300


def split_break_glass(words: list[str]) -> tuple[list[str], str | None]:
    """The words before `--break-glass`, and the reason after it (every word after it)."""
    at = next((i for i, w in enumerate(words) if w.lower() in _BREAK_GLASS_FLAGS), None)
    if at is None:
        return words, None
    reason = " ".join(words[at + 1 :]).strip()
    if not reason:
        raise UsageError(
            "Say why after `--break-glass`: `/deploy <pipeline> … --break-glass <reason>`."
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in reason):
        raise UsageError("The break-glass reason must be plain text, without control characters.")
    if len(reason) > MAX_BREAK_GLASS_REASON:
        raise UsageError(
            f"The break-glass reason is too long ({len(reason)} characters, at most "
            f"{MAX_BREAK_GLASS_REASON})."
        )
    return words[:at], reason


def _looks_like_commit(word: str) -> bool:
    # A short or over-long hex word with a digit is a mistyped SHA, not the first word of a message.
    return bool(_HEXISH.match(word)) and any(c.isdigit() for c in word)


def parse_build_ref(text: str, *, org: str, usage: str) -> BuildRef | HelpRequest:
    """Parse `<pipeline> <number>` or a pasted Buildkite build URL."""
    words = split_words(text)
    if is_help(words):
        return HelpRequest()
    if len(words) == 1 and words[0].startswith(("http://", "https://")):
        match = BUILD_URL.match(words[0])
        if not match:
            raise UsageError(
                f"`{typed(words[0])}` is not a Buildkite build URL "
                "(expected https://buildkite.com/<org>/<pipeline>/builds/<number>)."
            )
        if match.group("org") != org:
            raise UsageError(
                f"That build belongs to the organisation `{match.group('org')}`; "
                f"this bot works with `{org}`."
            )
        return BuildRef(check_pipeline(match.group("pipeline")), int(match.group("number")))
    if len(words) != 2:
        raise UsageError(f"Expected a pipeline and a build number.\n{usage}")
    pipeline = check_pipeline(words[0])
    number = words[1].lstrip("#")
    if not (number.isascii() and number.isdigit()) or not 0 < int(number) < 10**9:
        raise UsageError(f"`{typed(words[1])}` is not a build number.\n{usage}")
    return BuildRef(pipeline, int(number))
