"""One function per tool (`mutations`, `reads`, `waits`), each calling the same core services
the Slack listeners call, so that policy, confirmations, locks, claims and audit are theirs; and
the table of tools. Names, arguments, results and hints are a public interface (docs/agents.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from app.agents.arguments import (
    Args,
    BuildArgs,
    CheckPolicyArgs,
    DeployArgs,
    GetBuildArgs,
    HealthArgs,
    ListAgentsArgs,
    ListBuildsArgs,
    ListPipelinesArgs,
    NoArgs,
    RequestArgs,
    UnblockArgs,
    WaitBuildArgs,
    WaitRequestArgs,
)
from app.agents.budget import Spend
from app.agents.context import Context, Refused
from app.agents.tools.ledger import (
    DeploymentsArgs,
    DeploymentsResult,
    PromoteArgs,
    RollbackArgs,
    deployments,
    promote,
    rollback,
)
from app.agents.tools.mutations import (
    cancel_build,
    deploy,
    rebuild_build,
    retry_failed_jobs,
    unblock_job,
)
from app.agents.tools.reads import (
    build_health,
    check_policy,
    get_build,
    list_agents,
    list_builds,
    list_pipelines,
    whoami,
)
from app.agents.tools.waits import get_request, wait_for_build, wait_for_request
from app.agents.views import (
    CheckPolicyResult,
    GetBuildResult,
    HealthResult,
    ListAgentsResult,
    ListBuildsResult,
    ListPipelinesResult,
    MutationResult,
    RequestResult,
    View,
    WaitBuildResult,
    WhoAmIResult,
)

ToolFunction = Callable[[Context, Any], Awaitable[View]]


@dataclass(frozen=True)
class Tool:
    name: str
    run: ToolFunction
    args: type[Args]
    result: type[View]
    spend: Spend
    read_only: bool
    destructive: bool
    idempotent: bool
    #: A mutation: its result is kept for retries (idempotency).
    mutation: bool = False

    @property
    def description(self) -> str:
        return (self.run.__doc__ or "").strip()


def _mutation_tool(name: str, run: ToolFunction, args: type[Args], *, destructive: bool) -> Tool:
    # Idempotent: the same call (its key, or its arguments within the minute) is done once.
    return Tool(name, run, args, MutationResult, Spend.MUTATION, False, destructive, True, True)


def _read_tool(name: str, run: ToolFunction, args: type[Args], result: type[View]) -> Tool:
    return Tool(name, run, args, result, Spend.READ, True, False, True)


TOOLS: dict[str, Tool] = {
    tool.name: tool
    for tool in (
        _mutation_tool("deploy", deploy, DeployArgs, destructive=False),
        _mutation_tool("cancel_build", cancel_build, BuildArgs, destructive=True),
        _mutation_tool("rebuild_build", rebuild_build, BuildArgs, destructive=False),
        _mutation_tool("retry_failed_jobs", retry_failed_jobs, BuildArgs, destructive=False),
        _mutation_tool("unblock_job", unblock_job, UnblockArgs, destructive=False),
        # A rollback or a promotion is a deploy (a new build): nothing is destroyed.
        _mutation_tool("rollback", rollback, RollbackArgs, destructive=False),
        _mutation_tool("promote", promote, PromoteArgs, destructive=False),
        _read_tool("get_build", get_build, GetBuildArgs, GetBuildResult),
        _read_tool("list_builds", list_builds, ListBuildsArgs, ListBuildsResult),
        _read_tool("list_pipelines", list_pipelines, ListPipelinesArgs, ListPipelinesResult),
        _read_tool("list_agents", list_agents, ListAgentsArgs, ListAgentsResult),
        _read_tool("whoami", whoami, NoArgs, WhoAmIResult),
        _read_tool("build_health", build_health, HealthArgs, HealthResult),
        _read_tool("wait_for_build", wait_for_build, WaitBuildArgs, WaitBuildResult),
        _read_tool("get_request", get_request, RequestArgs, RequestResult),
        _read_tool("wait_for_request", wait_for_request, WaitRequestArgs, RequestResult),
        _read_tool("check_policy", check_policy, CheckPolicyArgs, CheckPolicyResult),
        _read_tool("deployments", deployments, DeploymentsArgs, DeploymentsResult),
    )
}

__all__ = ["TOOLS", "Context", "Refused", "Tool"]
