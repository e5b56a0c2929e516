"""Who may do what to which pipeline, from where: the deploy policy file and its checks.

The policy is a YAML file (path in POLICY_FILE). Rules are matched by exact pipeline slug first,
then by glob in file order, then the default rule. A missing file means "everyone may do
everything", said loudly in the log; a malformed file stops start-up naming the line.

`model` is the file's schema, `env` the env variable rules, `checks` the loaded `Policy` and
`loading` reads the file; import from the package, not from its modules.
"""

from app.core.policy.checks import Decision, GroupResolver, Policy, principal_ref
from app.core.policy.env import (
    BUILT_IN_ENV_DENY,
    ENV_NAME,
    MAX_ENV_NAME,
    MAX_ENV_VALUE,
    MAX_ENV_VARS,
    EnvRule,
)
from app.core.policy.loading import PolicyError, load_policy
from app.core.policy.model import (
    AGENT_PREFIX,
    DEFAULT_EVENTS,
    Action,
    AgentBudget,
    AgentSpec,
    Approval,
    AutoRetry,
    NotifyEvent,
    PolicyFile,
    Principals,
    Route,
    Rule,
    Superseded,
    UnblockFormSpec,
    is_agent,
    parse_duration,
)

__all__ = [
    "AGENT_PREFIX",
    "BUILT_IN_ENV_DENY",
    "DEFAULT_EVENTS",
    "ENV_NAME",
    "MAX_ENV_NAME",
    "MAX_ENV_VALUE",
    "MAX_ENV_VARS",
    "Action",
    "AgentBudget",
    "AgentSpec",
    "Approval",
    "AutoRetry",
    "Decision",
    "EnvRule",
    "GroupResolver",
    "NotifyEvent",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Principals",
    "Route",
    "Rule",
    "Superseded",
    "UnblockFormSpec",
    "is_agent",
    "load_policy",
    "parse_duration",
    "principal_ref",
]
