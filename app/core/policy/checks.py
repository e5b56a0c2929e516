"""The loaded policy's checks: which rule a pipeline falls under, who may do what to it and from
which channel, and the members of the user groups the rules name."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from app.core import freezes
from app.core.freezes import Occurrence
from app.core.policy.model import (
    AGENT_PREFIX,
    Action,
    AgentSpec,
    Approval,
    PolicyFile,
    Route,
    Rule,
    UnblockFormSpec,
    is_agent,
    is_group,
)
from app.core.unblock_forms import BlockForm, match_step
from app.slack.mrkdwn import code

# The package's name, as before it was split in modules: log filters key on it.
log = logging.getLogger(__package__)


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

    def active_freeze(self, pipeline: str, now: float) -> Occurrence | None:
        """The freeze window in force on `pipeline` at `now` (unix seconds), if any."""
        return freezes.active_freeze(self.data.freezes, pipeline, now)

    def freezes_in_force(self, pipeline: str, now: float) -> list[Occurrence]:
        """Every freeze occurrence in force on `pipeline` at `now`, overlapping ones included."""
        return freezes.freezes_in_force(self.data.freezes, pipeline, now)

    def freeze_refusal(self, pipeline: str, now: float, *, action: str = "deploy") -> str | None:
        """Why `action` (deploy, rebuild, rollback, promotion) of `pipeline` is refused at `now`:
        the freeze, its reason and its end; None when nothing is frozen. See app.core.freezes."""
        return freezes.freeze_refusal(self.data.freezes, pipeline, now, action=action)

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
            if is_group(principal):
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
        if is_agent(user):  # an agent is never an admin (nor anyone the admins' groups hold)
            return False
        return user in await self.members(self.data.admins, resolve)

    def agent(self, name: str) -> AgentSpec | None:
        """The declared agent of that name (see app.agents), or None."""
        return self.data.agents.get(name)

    def acts_for(self, user: str) -> str | None:
        """The person an agent (`agent:<name>`) works for, if it names one; None for people."""
        spec = self.agent(user.removeprefix(AGENT_PREFIX)) if is_agent(user) else None
        return spec.acts_for if spec is not None else None

    def approvers(self, rule: Rule, *, requester: str, break_glass: bool = False) -> list[str]:
        """Who may approve `requester`'s protected deploy: the rule's approvers; for a
        break-glass deploy on a rule without any, the admins; for an agent on a rule that only
        protects, the people who may deploy it and the admins; never the person an agent acts
        for."""
        person = self.acts_for(requester)  # never the agent's own person (self-approval)
        if rule.approval is not None:
            return [p for p in rule.approval.approvers if p != person]
        if break_glass:
            return [a for a in self.data.admins if a != person]
        if not is_agent(requester):
            return []
        people = [p for p in rule.deployers or [] if not is_agent(p) and p != person]
        return [*people, *(a for a in self.data.admins if a not in people and a != person)]

    def approval_expiry(self, rule: Rule, *, requester: str) -> int | None:
        """How long an approval request of `requester` stays open, or None when the rule asks
        for none (a person confirms a protected deploy themselves; an agent never does)."""
        if rule.approval is not None:
            return rule.approval.expires_after
        if is_agent(requester) and rule.asks_first:
            return Approval.model_fields["expires_after"].get_default()  # type: ignore[no-any-return]
        return None

    def agent_channel(self, name: str, pipeline: str) -> str | None:
        """Where the agent acts on `pipeline`: its own `channel:`, else the rule's first channel
        when that is a channel id (a #name cannot be posted to reliably), else None."""
        spec = self.agent(name)
        if spec is not None and spec.channel:
            return spec.channel
        channels = self.rule_for(pipeline).channels or []
        first = channels[0] if channels else None
        return first if first is not None and not first.startswith("#") else None

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
        """May `user` do `action` on `pipeline` from this channel? Admins may do anything.

        An agent (`agent:<name>`) may only do what the rule grants to it by name, and never more
        than the person it acts for may do from the same channel.
        """
        rule = self.rule_for(pipeline)
        if is_agent(user):
            return await self._check_agent(
                action, pipeline, rule, user, channel_id, channel_name, resolve
            )
        if await self.is_admin(user, resolve):
            return Decision(True, rule.name)
        if rule.channels is not None and not _in_channels(rule.channels, channel_id, channel_name):
            where = ", ".join(_channel_ref(c) for c in rule.channels) or "no channel"
            return Decision(
                False,
                rule.name,
                f"`{pipeline}` may only be driven from {where} (policy rule {code(rule.name)}).",
            )
        allowed = rule.allowed(action)
        if allowed is None or user in await self.members(allowed, resolve):
            return Decision(True, rule.name)
        who = ", ".join(principal_ref(p) for p in [*allowed, *self.data.admins]) or "nobody"
        return Decision(
            False,
            rule.name,
            f"You may not {action.value} `{pipeline}`: policy rule {code(rule.name)} allows it to "
            f"{who}.",
        )

    async def _check_agent(
        self,
        action: Action,
        pipeline: str,
        rule: Rule,
        agent: str,
        channel_id: str,
        channel_name: str | None,
        resolve: GroupResolver,
    ) -> Decision:
        name = agent.removeprefix(AGENT_PREFIX)
        spec = self.agent(name)
        if spec is None:
            return Decision(False, rule.name, f"Agent `{name}` is not declared in the policy.")
        if rule.channels is not None and not _in_channels(rule.channels, channel_id, channel_name):
            where = ", ".join(_channel_ref(c) for c in rule.channels) or "no channel"
            return Decision(
                False,
                rule.name,
                f"`{pipeline}` may only be driven from {where} "
                f"(policy rule {code(rule.name)}), and agent `{name}` acts in <#{channel_id}>.",
            )
        if agent not in (rule.allowed(action) or []):  # denied unless granted by name
            return Decision(
                False,
                rule.name,
                f"Agent `{name}` may not {action.value} `{pipeline}`: "
                f"policy rule {code(rule.name)} does not grant it to `{agent}`.",
            )
        if spec.acts_for is not None:
            person = await self.check(
                action,
                pipeline,
                user=spec.acts_for,
                channel_id=channel_id,
                channel_name=channel_name,
                resolve=resolve,
            )
            if not person.allowed:
                return Decision(
                    False,
                    rule.name,
                    f"Agent `{name}` acts for <@{spec.acts_for}>, who may not {action.value} "
                    f"`{pipeline}` (policy rule {code(rule.name)}): an agent never has more rights "
                    "than its person.",
                )
        return Decision(True, rule.name)


def _in_channels(channels: list[str], channel_id: str, channel_name: str | None) -> bool:
    return channel_id in channels or (channel_name is not None and f"#{channel_name}" in channels)


def _channel_ref(channel: str) -> str:
    return channel if channel.startswith("#") else f"<#{channel}>"


def principal_ref(principal: str) -> str:
    """A Slack mention of a user or a user group (an agent by its name), as a refusal names who
    may."""
    if is_agent(principal):
        return f"`{principal}`"
    return f"<!subteam^{principal}>" if is_group(principal) else f"<@{principal}>"
