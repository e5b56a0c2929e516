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
from app.core.policy.model import Action, PolicyFile, Route, Rule, UnblockFormSpec, is_group
from app.core.unblock_forms import BlockForm, match_step

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
        who = ", ".join(principal_ref(p) for p in [*allowed, *self.data.admins]) or "nobody"
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
    """A Slack mention of a user or a user group, as a refusal names who may."""
    return f"<!subteam^{principal}>" if is_group(principal) else f"<@{principal}>"
