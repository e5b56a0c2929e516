"""Every action id, block id and callback id the bot puts into Block Kit, and listens for."""

from __future__ import annotations

from enum import StrEnum


class ActionId(StrEnum):
    """The action_id of every button the bot renders."""

    CANCEL = "build_cancel"
    REBUILD = "build_rebuild"
    OPEN = "build_open"
    UNBLOCK = "build_unblock"
    RETRY_FAILED = "build_retry_failed"
    CONFIRM_DEPLOY = "deploy_confirm"
    ABORT_DEPLOY = "deploy_abort"
    APPROVE = "approval_approve"
    REJECT = "approval_reject"
    PIPELINES_MORE = "pipelines_more"
    BUILDS_MORE = "builds_more"
    AGENTS_MORE = "agents_more"
    AGENT_STOP = "agent_stop"
    AGENT_FORCE_STOP = "agent_force_stop"
    PIPELINE_DELETE = "pipeline_delete"
    #: The buttons and selects of a person's App Home.
    HOME_CANCEL = "home_cancel"
    HOME_REBUILD = "home_rebuild"
    HOME_RETRY = "home_retry"
    HOME_UNBLOCK = "home_unblock"
    HOME_APPROVE = "home_approve"
    HOME_REJECT = "home_reject"
    HOME_UNLOCK = "home_unlock"
    HOME_DM_MODE = "home_dm_mode"
    HOME_QUIET_FROM = "home_quiet_from"
    HOME_QUIET_TO = "home_quiet_to"


class CallbackId(StrEnum):
    """The callback_id of every modal the bot opens."""

    UNBLOCK = "unblock_submit"
    PIPELINE_CREATE = "pipeline_create"
    PIPELINE_UPDATE = "pipeline_update"
    #: The "Follow this build" message shortcut.
    FOLLOW_BUILD = "follow_build"


class BlockId(StrEnum):
    """The block_id of the bot's actions blocks and of its modals' fixed inputs."""

    BUILD_ACTIONS = "build_actions"
    DEPLOY_CONFIRMATION = "deploy_confirmation"
    APPROVAL = "approval"
    PIPELINES_MORE = "pipelines_more"
    BUILDS_MORE = "builds_more"
    AGENTS_MORE = "agents_more"
    PIPELINE_DELETE = "pipeline_delete"
    #: The free-form `key=value` input (a block step whose fields the bot does not know).
    UNBLOCK_FREEFORM = "unblock_freeform"
    #: The pipeline form's inputs, named as the fields they set.
    NAME = "name"
    REPOSITORY = "repository"
    DEFAULT_BRANCH = "default_branch"
    DESCRIPTION = "description"
    STEPS = "steps"


#: The action_id of every input in the bot's modals (each input block holds one element).
INPUT_ACTION = "value"

#: Before a block step field's key, in the block_id of its input.
FIELD_PREFIX = "field:"


def field_block_id(key: str) -> str:
    """The block_id of a block step field's input (Slack takes at most 255 characters)."""
    return f"{FIELD_PREFIX}{key}"[:255]


def field_key(block_id: str) -> str | None:
    """The field key of an input's block_id, or None when it is not a field's input."""
    return block_id.removeprefix(FIELD_PREFIX) if block_id.startswith(FIELD_PREFIX) else None


def agent_block_id(agent_id: str) -> str:
    """The block_id of an agent's Stop buttons."""
    return f"agent:{agent_id}"[:255]
