"""Slack listeners, one module per surface; `register(app)` wires them all."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from handlers import admin, builds, deploy, home, mentions, unfurls

#: Every slash command the bot listens to (the manifest must declare exactly these).
COMMANDS: tuple[str, ...] = deploy.COMMANDS + admin.COMMANDS
#: Every Events API event the bot listens to (the manifest must subscribe to exactly these).
EVENTS: tuple[str, ...] = mentions.EVENTS + unfurls.EVENTS + home.EVENTS
#: Every shortcut's callback id (the manifest must declare exactly these).
SHORTCUTS: tuple[str, ...] = unfurls.SHORTCUTS


def register(app: AsyncApp) -> None:
    deploy.register(app)
    builds.register(app)
    admin.register(app)
    mentions.register(app)
    unfurls.register(app)
    home.register(app)
