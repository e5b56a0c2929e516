"""Parsing of the release ledger's /deploy subcommands: status, history, rollback, promote."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.core.commands.deploy import UsageError, check_pipeline, split_break_glass
from app.slack.mrkdwn import typed

#: ASCII digits only: str.isdigit() also takes "²", which int() then refuses.
_NUMBER = re.compile(r"[0-9]{1,9}")

MAX_HISTORY = 50
DEFAULT_HISTORY = 10
#: A rollback target typed after `--break-glass`, where it is taken for part of the reason.
_TARGET_IN_REASON = re.compile(r"\bto\s+#[0-9]+\b", re.IGNORECASE)

STATUS_USAGE = "Usage: `/deploy status [pipeline|all]`"
HISTORY_USAGE = f"Usage: `/deploy history <pipeline> [n]` (n from 1 to {MAX_HISTORY})"
ROLLBACK_USAGE = "Usage: `/deploy rollback <pipeline> [to #N] [--break-glass <reason>]`"
PROMOTE_USAGE = "Usage: `/deploy promote <pipeline> [--break-glass <reason>]`"

RELEASE_USAGE = (
    "• `/deploy status [pipeline|all]`: what is live, deploying now and locked\n"
    "• `/deploy history <pipeline> [n]`: the last n deployments\n"
    "• `/deploy rollback <pipeline> [to #N]`: deploy again the previous passed deployment "
    "(or build #N)\n"
    "• `/deploy promote <pipeline>`: deploy the commit live on its `promote_from` pipeline\n"
    "• during a freeze, `--break-glass <reason>` after a rollback or a promotion asks a second "
    "person to approve it"
)


@dataclass(frozen=True)
class StatusRequest:
    #: None: every pipeline in the ledger (`all`, or nothing typed).
    pipeline: str | None = None


@dataclass(frozen=True)
class HistoryRequest:
    pipeline: str
    count: int = DEFAULT_HISTORY


@dataclass(frozen=True)
class RollbackRequest:
    pipeline: str
    #: The build to go back to; None: the passed deployment before the live one.
    to: int | None = None
    #: The reason given with `--break-glass`: roll back through a freeze, once approved.
    break_glass: str | None = None


@dataclass(frozen=True)
class PromoteRequest:
    pipeline: str
    #: The reason given with `--break-glass`: promote through a freeze, once approved.
    break_glass: str | None = None


ReleaseCommand = StatusRequest | HistoryRequest | RollbackRequest | PromoteRequest

SUBCOMMANDS = frozenset({"status", "history", "rollback", "promote"})


def parse_release(words: list[str]) -> ReleaseCommand | None:
    """One of the ledger's subcommands, or None when `words` are not one (a deploy, say)."""
    if not words or words[0].lower() not in SUBCOMMANDS:
        return None
    sub, args = words[0].lower(), words[1:]
    if sub == "status":
        if len(args) > 1:
            raise UsageError(STATUS_USAGE)
        if not args or args[0].lower() == "all":
            return StatusRequest()
        return StatusRequest(check_pipeline(args[0]))
    if sub == "history":
        if not 1 <= len(args) <= 2:
            raise UsageError(HISTORY_USAGE)
        count = DEFAULT_HISTORY
        if len(args) == 2:
            if not _NUMBER.fullmatch(args[1]) or not 1 <= int(args[1]) <= MAX_HISTORY:
                raise UsageError(
                    f"`{typed(args[1])}` is not a number of deployments.\n{HISTORY_USAGE}"
                )
            count = int(args[1])
        return HistoryRequest(check_pipeline(args[0]), count)
    # A rollback or a promotion: each may go through a freeze, as a /deploy may.
    args, break_glass = split_break_glass(args)
    if sub == "rollback":
        if len(args) not in (1, 3) and not (len(args) == 2 and args[1].startswith("#")):
            raise UsageError(ROLLBACK_USAGE)
        pipeline = check_pipeline(args[0]) if args else ""
        rest = args[1:]
        if rest and rest[0].lower() == "to":
            rest = rest[1:]
        if not rest:
            if break_glass is not None and _TARGET_IN_REASON.search(break_glass):
                # `rollback web --break-glass db down, to #3`: #3 would be read as the reason.
                raise UsageError(
                    "Put `to #N` before `--break-glass`: every word after it is the reason.\n"
                    + ROLLBACK_USAGE
                )
            return RollbackRequest(pipeline, break_glass=break_glass)
        number = rest[0].lstrip("#")
        if len(rest) != 1 or not _NUMBER.fullmatch(number) or int(number) == 0:
            raise UsageError(f"`{typed(' '.join(rest))}` is not a build number.\n{ROLLBACK_USAGE}")
        return RollbackRequest(pipeline, int(number), break_glass=break_glass)
    if len(args) != 1:
        raise UsageError(PROMOTE_USAGE)
    return PromoteRequest(check_pipeline(args[0]), break_glass=break_glass)
