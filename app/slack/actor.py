"""Who asked, and from where, read from what Slack sent: a command, a click or a submission."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Actor:
    """Who asked, and from where: what the policy and the audit trail need to know."""

    user_id: str
    user_name: str
    channel_id: str
    channel_name: str | None = None
    response_url: str | None = None

    @classmethod
    def from_user(
        cls,
        user: Mapping[str, Any],
        channel_id: str,
        *,
        channel_name: str | None = None,
        response_url: str | None = None,
    ) -> Actor:
        """From the `user` object of an interaction payload (button click, modal submission)."""
        return cls(
            user_id=user["id"],
            user_name=user.get("username") or user.get("name") or user["id"],
            channel_id=channel_id,
            channel_name=channel_name,
            response_url=response_url,
        )

    @classmethod
    def from_button(cls, body: Mapping[str, Any]) -> Actor:
        """The person who clicked a button, in the channel of the clicked message."""
        channel = body.get("channel") or {}
        return cls.from_user(
            body["user"],
            channel.get("id") or body["container"]["channel_id"],
            channel_name=channel.get("name"),
            response_url=body.get("response_url"),
        )

    @classmethod
    def from_command(cls, command: Mapping[str, Any]) -> Actor:
        """The person who ran a slash command, in its channel."""
        return cls(
            user_id=command["user_id"],
            user_name=command.get("user_name") or command["user_id"],
            channel_id=command["channel_id"],
            channel_name=command.get("channel_name"),
            response_url=command.get("response_url"),
        )
