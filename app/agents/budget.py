"""Each agent's budget: mutations an hour and reads a minute, counted in Redis so that every
replica spends from the same one."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from app.agents.identity import Agent
from app.storage.store import Store


class Spend(StrEnum):
    """What a tool call spends."""

    READ = "reads"
    MUTATION = "mutations"


class BudgetExhausted(Exception):
    """The agent spent this budget for now; `retry_after` seconds until the next window."""

    def __init__(self, agent: Agent, spend: Spend, retry_after: float, *, first: bool) -> None:
        self.retry_after = retry_after
        #: The window's first refusal (the later ones are counted, not audited one by one).
        self.first = first
        per = "hour" if spend is Spend.MUTATION else "minute"
        limit = (
            agent.budget.mutations_per_hour
            if spend is Spend.MUTATION
            else agent.budget.reads_per_minute
        )
        super().__init__(
            f"Agent {agent.name} has used its budget of {limit} {spend.value} per {per}: "
            f"try again in {int(retry_after)} s."
        )


class Budgets:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def spend(self, agent: Agent, spend: Spend) -> None:
        """Take one from the agent's budget, or raise BudgetExhausted saying when to retry."""
        if spend is Spend.MUTATION:
            limit, window = agent.budget.mutations_per_hour, 3600
        else:
            limit, window = agent.budget.reads_per_minute, 60
        wait, used = await self.store.spend_budget(
            agent.name, spend.value, limit=limit, window=window, now=self.clock()
        )
        if wait is not None:
            raise BudgetExhausted(agent, spend, wait, first=used == limit + 1)
