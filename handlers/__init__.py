"""Slack listeners, one module per surface; `register(app)` wires them all."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from handlers import builds, deploy, operator

#: Every slash command the bot listens to (the manifest must declare exactly these).
COMMANDS: tuple[str, ...] = deploy.COMMANDS + operator.COMMANDS


def register(app: AsyncApp) -> None:
    deploy.register(app)
    builds.register(app)
    operator.register(app)
