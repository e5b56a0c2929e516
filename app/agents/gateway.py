"""What every tool call goes through, whichever transport brought it: a reference id for its
log lines, argument validation, the agent's budget, a mutation's identity (so that a retry is
answered with the first result), the audit entry, and errors turned into plain sentences."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from app.agents.budget import BudgetExhausted, Budgets, Spend
from app.agents.identity import Agent, Identities
from app.agents.tools import TOOLS, Context, Refused, Tool
from app.agents.views import MutationResult, View, plain_sentence
from app.agents.waiting import Changes
from app.core.errors import UserError, explain
from app.core.services import Services
from app.ops import logs
from app.ops.metrics import Metrics
from buildkite.errors import BuildkiteError

log = logging.getLogger(__name__)

#: Env names whose values the audit trail masks.
_SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASS|PWD|KEY|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION|CERT|SIGN|DSN)", re.I
)
#: Values that look like a credential, whatever their name: well-known token prefixes, keys,
#: JWTs, URLs with a password, and long unbroken runs of base64 or hex.
_SECRET_VALUE = re.compile(
    r"(xox[abposr]-|xapp-|gh[opsur]_|github_pat_|glpat-|bkua_|sk-|AKIA[0-9A-Z]{12}|"
    r"-----BEGIN|eyJ[A-Za-z0-9_-]{8,}\.|://[^/\s:@]*:[^/\s@]+@|[A-Za-z0-9+/=_-]{32,})"
)
#: How a Buildkite refusal names what was asked.
_VERBS = {
    "deploy": "deploy",
    "cancel_build": "cancel",
    "rebuild_build": "rebuild",
    "retry_failed_jobs": "retry the failed jobs of",
    "unblock_job": "unblock",
    "rollback": "roll back",
    "promote": "promote",
}
#: Seconds between looks for the first result while a retry of a running call waits.
_DUPLICATE_POLL = 0.1


@dataclass(frozen=True)
class CallResult:
    """A tool call's answer: structured content (None for an error) and its text."""

    structured: dict[str, Any] | None
    text: str
    is_error: bool = False


def reference_sentence(text: str, reference: str) -> str:
    return f"{text.rstrip()} (reference {reference})"


class Gateway:
    """Runs agents' tool calls against the process's services."""

    def __init__(
        self,
        services: Services,
        changes: Changes,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.services = services
        self.changes = changes
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.agent_waits.set_function(lambda: changes.waiting)
        self.identities = Identities(services.policy)
        self.budgets = Budgets(services.store, clock=clock)
        self.clock = clock

    async def call(
        self, agent: Agent, name: str, arguments: Mapping[str, Any] | None
    ) -> CallResult:
        reference = logs.new_correlation_id()
        tool = TOOLS.get(name)
        # Spent first, whatever follows: an agent's calls (a flood of bad ones included) are
        # bounded by its budget, and so is what they add to the audit trail.
        try:
            await self.budgets.spend(agent, tool.spend if tool else Spend.READ)
        except BudgetExhausted as exc:
            if tool is None:
                return self._error(str(exc), reference)
            if exc.first:
                await self._audit(agent, tool, arguments, "refused", reference, detail="budget")
            else:
                self.metrics.agent_calls.labels(tool.name, "refused").inc()
            return self._refusal(tool, str(exc), reference)
        except RedisError:
            return self._error(
                "The bot cannot reach its Redis right now, so nothing was done; try again in a "
                "minute.",
                reference,
            )
        if tool is None:
            await self.services.auditor.record(
                user=agent.user_id,
                action="mcp (unknown tool)",
                pipeline="",
                channel="",
                outcome="invalid",
                detail=f"tool {name[:60]!r}; ref {reference}",
            )
            self.metrics.agent_calls.labels("(unknown)", "invalid").inc()
            return self._error(f"There is no tool {name[:60]!r}.", reference)
        try:
            args = tool.args.model_validate(dict(arguments or {}))
        except ValidationError as exc:
            text = "The arguments are not valid: " + _problems(exc)
            await self._audit(agent, tool, arguments, "invalid", reference, detail=text)
            return self._error(text, reference)
        pipeline = str(getattr(args, "pipeline", "") or "")
        if tool.mutation:
            return await self._mutate(agent, tool, args, arguments, pipeline, reference)
        result = await self._run(agent, tool, args, arguments, reference, trigger=reference)
        return result

    async def _mutate(
        self,
        agent: Agent,
        tool: Tool,
        args: Any,
        arguments: Mapping[str, Any] | None,
        pipeline: str,
        reference: str,
    ) -> CallResult:
        key = args.idempotency_key or self._derived_key(tool, args)
        this_call = _fingerprint(tool, args)
        store = self.services.store
        try:
            prior = await store.begin_call(agent.name, key)
            if prior == "":
                prior = await self._first_result(agent, key)
                if prior is None:  # the first call did nothing and let go: this one may
                    prior = await store.begin_call(agent.name, key)
        except RedisError:
            return self._refusal(
                tool,
                "The bot cannot reach its Redis right now, so nothing was done; try again in a "
                "minute.",
                reference,
            )
        if prior is not None:
            if prior == "":
                return self._refusal(
                    tool, "The same call is still being done: call again in a moment.", reference
                )
            kept = _kept_result(prior)
            if kept.call is not None and kept.call != this_call:
                text = (
                    f"The idempotency_key {key} was already used for another call (another tool "
                    "or other arguments), so nothing was done: use a new key for a new call."
                )
                await self._audit(agent, tool, arguments, "refused", reference, detail="key reused")
                return self._refusal(tool, text, reference)
            await self._audit(agent, tool, arguments, "repeated", reference)
            return CallResult(structured=kept.result, text=json.dumps(kept.result))
        trigger = f"{agent.user_id}:{tool.name}:{key}"
        try:
            result = await self._run(agent, tool, args, arguments, reference, trigger=trigger)
        except BaseException:
            await self._drop(agent, key)
            raise
        if result.is_error or (result.structured or {}).get("status") == "refused":
            await self._drop(agent, key)  # nothing was done: a retry is decided afresh
        else:
            try:
                keeping = json.dumps({"call": this_call, "result": result.structured})
                await store.finish_call(agent.name, key, keeping)
            except RedisError as exc:
                log.warning(
                    "agent %s: the result of %s was not kept: %s", agent.name, tool.name, exc
                )
        return result

    async def _first_result(self, agent: Agent, key: str) -> str | None:
        """The first call's result once it is kept, "" if it runs past the patience, None if it
        did nothing and let its identity go."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.services.tuning.agents.duplicate_patience
        while loop.time() < deadline:
            await asyncio.sleep(_DUPLICATE_POLL)
            found = await self.services.store.call_result(agent.name, key)
            if found is None or found:
                return found
        return ""

    async def _drop(self, agent: Agent, key: str) -> None:
        try:
            await self.services.store.drop_call(agent.name, key)
        except RedisError as exc:
            log.warning("agent %s: a failed call's identity was not released: %s", agent.name, exc)

    def _derived_key(self, tool: Tool, args: Any) -> str:
        """A call without idempotency_key: its identity is its arguments within the minute."""
        canonical = json.dumps(args.model_dump(mode="json"), sort_keys=True)
        minute = int(self.clock() // 60)
        digest = hashlib.sha256(f"{tool.name}\x1f{canonical}\x1f{minute}".encode()).hexdigest()
        return f"auto-{digest[:32]}"

    async def _run(
        self,
        agent: Agent,
        tool: Tool,
        args: Any,
        arguments: Mapping[str, Any] | None,
        reference: str,
        *,
        trigger: str,
    ) -> CallResult:
        ctx = Context(agent=agent, services=self.services, changes=self.changes, trigger=trigger)
        try:
            view: View = await tool.run(ctx, args)
        except (UserError, Refused) as exc:
            text = plain_sentence(exc.text if isinstance(exc, UserError) else str(exc))
            await self._audit(agent, tool, arguments, "refused", reference, detail=text)
            return self._refusal(tool, text, reference)
        except BuildkiteError as exc:  # what a listener would explain (an unblock refused)
            pipeline = str(getattr(args, "pipeline", "") or self.services.buildkite.org)
            number = getattr(args, "number", None)
            verb = _VERBS.get(tool.name, "do that to")
            text = plain_sentence(explain(exc, action=verb, pipeline=pipeline, number=number))
            await self._audit(agent, tool, arguments, "failed", reference, detail=text)
            return self._refusal(tool, text, reference)
        except RedisError as exc:
            log.warning("agent %s: %s failed, redis unavailable: %s", agent.name, tool.name, exc)
            await self._audit(agent, tool, arguments, "failed", reference, detail="redis")
            return self._error(
                "The bot cannot reach its Redis right now; try again in a minute.", reference
            )
        except Exception:
            log.exception("agent %s: %s failed unexpectedly", agent.name, tool.name)
            await self._audit(agent, tool, arguments, "failed", reference, detail="unexpected")
            return self._error("Something went wrong in the bot; nothing more is known.", reference)
        data = view.model_dump(mode="json", exclude_none=True)
        outcome = str(data.get("status") or "answered")
        await self._audit(agent, tool, arguments, outcome, reference, build=_number(data))
        return CallResult(structured=data, text=json.dumps(data))

    def _refusal(self, tool: Tool, text: str, reference: str) -> CallResult:
        """A refused mutation is a result (status refused); a refused read is an error."""
        sentence = reference_sentence(text, reference)
        if tool.result is MutationResult:
            data = MutationResult(status="refused", reason=sentence).model_dump(exclude_none=True)
            return CallResult(structured=data, text=json.dumps(data))
        return CallResult(structured=None, text=sentence, is_error=True)

    def _error(self, text: str, reference: str) -> CallResult:
        return CallResult(structured=None, text=reference_sentence(text, reference), is_error=True)

    async def _audit(
        self,
        agent: Agent,
        tool: Tool,
        arguments: Mapping[str, Any] | None,
        outcome: str,
        reference: str,
        *,
        build: int | None = None,
        detail: str = "",
    ) -> None:
        self.metrics.agent_calls.labels(tool.name, outcome).inc()
        pipeline = ""
        if isinstance(arguments, Mapping) and isinstance(arguments.get("pipeline"), str):
            pipeline = arguments["pipeline"][:100]
        channel = self.services.policy.agent_channel(agent.name, pipeline) if pipeline else None
        parts = [f"for {agent.acts_for}" if agent.acts_for else "for nobody"]
        parts.append(f"args {masked(arguments)}")
        if detail:
            parts.append(detail)
        parts.append(f"ref {reference}")
        await self.services.auditor.record(
            user=agent.user_id,
            action=f"mcp {tool.name}",
            pipeline=pipeline,
            channel=channel or "",
            outcome=outcome,
            number=build,
            detail="; ".join(parts),
        )


def masked(arguments: Mapping[str, Any] | None) -> str:
    """A call's arguments for the audit trail: env values and block-step fields whose names
    look secret are masked, and the whole is cut short."""
    if not isinstance(arguments, Mapping):
        return "{}"
    shown: dict[str, Any] = {}
    for key, value in list(arguments.items())[:20]:
        if key in ("env", "fields") and isinstance(value, Mapping):
            shown[key] = {
                str(k)[:60]: "***" if _looks_secret(str(k), str(v)) else str(v)[:60]
                for k, v in list(value.items())[:30]
            }
        else:
            shown[str(key)[:60]] = (
                value if isinstance(value, int | float | bool) else str(value)[:100]
            )
    return json.dumps(shown, sort_keys=True)[:400]


def _looks_secret(name: str, value: str) -> bool:
    return bool(_SECRET_NAME.search(name) or _SECRET_VALUE.search(value))


def _fingerprint(tool: Tool, args: Any) -> str:
    """What a mutation call asks for (its tool and arguments, not its key), as a digest."""
    asked = args.model_dump(mode="json", exclude={"idempotency_key"})
    canonical = json.dumps(asked, sort_keys=True)
    return hashlib.sha256(f"{tool.name}\x1f{canonical}".encode()).hexdigest()


@dataclass(frozen=True)
class _Kept:
    #: The fingerprint of the call that kept it (None: kept before fingerprints were).
    call: str | None
    result: dict[str, Any]


def _kept_result(raw: str) -> _Kept:
    data = json.loads(raw)
    if isinstance(data, dict) and set(data) == {"call", "result"}:
        return _Kept(call=str(data["call"]), result=data["result"])
    return _Kept(call=None, result=data)


def _number(data: Mapping[str, Any]) -> int | None:
    build = data.get("build")
    number = build.get("number") if isinstance(build, Mapping) else None
    return number if isinstance(number, int) else None


def _problems(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(arguments)"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems) + "."


def create_gateway(services: Services, metrics: Metrics | None = None) -> Gateway:
    """The process's gateway, with its one subscription to the store's change announcements."""
    changes = Changes(services.store, recheck=services.tuning.agents.wait_recheck)
    return Gateway(services, changes, metrics=metrics)
