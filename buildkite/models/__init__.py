"""Typed views of Buildkite REST API v2 resources: only the fields the bot uses.

Read generously: every model ignores unknown fields, and tolerates the empty objects
(``"author": {}``) and nulls that real responses contain, an author given as a bare email, build
states Buildkite added after this code, and both of Buildkite's time formats
(``2015-05-09T21:05:59.874Z`` and ``2021-06-01 08:23:35 UTC``). A time that cannot be read at
all is dropped (``None``) rather than failing the object around it.

Builds and jobs are in ``builds``, the other resources in ``resources``, what they share in
``common``; every name is importable from here.
"""

from buildkite.models.builds import (
    ACTIVE_STATES,
    FAILED_JOB_STATES,
    STATE_FILTERS,
    TERMINAL_STATES,
    Build,
    BuildState,
    Job,
    JobAgent,
    PipelineRef,
    RebuiltFrom,
)
from buildkite.models.common import ApiModel, Author, Person, Timestamp, fields_at_fault, item_id
from buildkite.models.resources import AccessToken, Agent, Cluster, Organization, Pipeline, User

__all__ = [
    "ACTIVE_STATES",
    "FAILED_JOB_STATES",
    "STATE_FILTERS",
    "TERMINAL_STATES",
    "AccessToken",
    "Agent",
    "ApiModel",
    "Author",
    "Build",
    "BuildState",
    "Cluster",
    "Job",
    "JobAgent",
    "Organization",
    "Person",
    "Pipeline",
    "PipelineRef",
    "RebuiltFrom",
    "Timestamp",
    "User",
    "fields_at_fault",
    "item_id",
]
