"""The Slack app manifest is valid, and declares exactly what the code listens to and uses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import handlers
from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack

ROOT = Path(__file__).resolve().parent.parent
# A copy of slackapi/manifest-schema's schema (see tests/data/SOURCE.txt).
SCHEMA = ROOT / "tests/data/manifest.schema.1.0.0.json"


def _manifest() -> dict[str, Any]:
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text())
    assert isinstance(manifest, dict)
    return manifest


def _schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA.read_text())
    assert isinstance(schema, dict)
    return schema


def test_manifest_is_valid_against_slacks_schema() -> None:
    jsonschema.validate(_manifest(), _schema())


def test_an_invalid_manifest_is_caught_by_the_schema() -> None:
    manifest = _manifest()
    manifest["features"]["slash_commands"][0]["command"] = "deploy"  # no leading slash
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, _schema())


async def test_manifest_commands_match_the_registered_listeners(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    """Each declared command is answered by the running bot; an undeclared one is not."""
    declared = {c["command"] for c in _manifest()["features"]["slash_commands"]}
    assert declared == set(handlers.COMMANDS)
    async with running_bot(slack, bk, redis_url) as bot:
        for command in sorted(declared):
            resp, _, ack = await bot.command(command, "help")
            assert resp.status == 200, command
            assert f"*Usage:* `{command}" in ack["text"]
        unknown, _, _ = await bot.command("/not-declared", "help")
        assert unknown.status == 404


def test_every_command_has_a_description_and_usage_hint() -> None:
    for command in _manifest()["features"]["slash_commands"]:
        assert command["description"].strip()
        assert command["usage_hint"].strip()
        assert command["should_escape"] is False  # the parser expects raw text


#: The bot scopes each Web API method the bot calls needs.
SCOPES_FOR = {
    "chat.postMessage": {"chat:write", "chat:write.public"},
    "chat.update": {"chat:write"},
    "chat.postEphemeral": {"chat:write"},
    "views.open": set(),
    "views.update": set(),
    "users.lookupByEmail": {"users:read", "users:read.email"},
    "users.info": {"users:read", "users:read.email"},
    "usergroups.users.list": {"usergroups:read"},
    "conversations.history": {"channels:history", "groups:history", "im:history"},
    "conversations.replies": {"channels:history", "groups:history"},
    "chat.unfurl": {"links:write"},
    "views.publish": set(),
    "conversations.open": {"im:write"},
}
#: The bot scopes each Events API event the bot subscribes to needs.
SCOPES_FOR_EVENT = {
    "app_mention": {"app_mentions:read"},
    "link_shared": {"links:read"},
    "app_home_opened": set(),
}


def _methods_called() -> set[str]:
    used = set()
    for folder in ("app", "handlers"):
        for path in (ROOT / folder).rglob("*.py"):
            # The sandbox and the simulators read and serve the fake Slack; they call nothing.
            if {"sandbox", "simulators"} & set(path.parts):
                continue
            text = path.read_text()
            used |= set(re.findall(r'"((?:chat|users|usergroups|views|conversations)\.\w+)"', text))
            # slack_sdk names each method after its API name with dots as underscores.
            for attr in re.findall(
                r"\.((?:chat|users|usergroups|views|conversations)_\w+)\(", text
            ):
                used.add(attr.replace("_", "."))
    return used


def test_scopes_are_exactly_the_ones_the_code_uses() -> None:
    scopes = set(_manifest()["oauth_config"]["scopes"]["bot"])
    used = _methods_called()
    assert used <= set(SCOPES_FOR), f"a method with unknown scopes is called: {used}"
    events = _bot_events()
    assert events <= set(SCOPES_FOR_EVENT), f"an event with unknown scopes: {events}"
    needed = {"commands"}.union(
        *(SCOPES_FOR[m] for m in used), *(SCOPES_FOR_EVENT[e] for e in events)
    )
    assert scopes == needed


def _bot_events() -> set[str]:
    return set(_manifest()["settings"].get("event_subscriptions", {}).get("bot_events", []))


def test_the_subscribed_events_are_exactly_the_listened_ones() -> None:
    assert _bot_events() == set(handlers.EVENTS)


def _event(slack: FakeSlack, bk: FakeBuildkite, event_type: str) -> dict[str, Any]:
    """A delivery of each subscribed event, as a person's action in Slack makes it."""
    if event_type == "app_mention":
        ts = slack.add_message("C0CHAN", "<@U0BOT> help", user="U0USER")
        return {
            "type": "app_mention",
            "user": "U0USER",
            "text": "<@U0BOT> help",
            "ts": ts,
            "channel": "C0CHAN",
            "event_ts": ts,
        }
    if event_type == "link_shared":
        if "web" not in bk.pipelines:
            bk.add_pipeline("web")
        number = bk.add_build("web", state="passed")["number"]
        url = f"https://buildkite.com/{bk.org}/web/builds/{number}"
        return slack.share_links("C0CHAN", "U0USER", [url])
    if event_type == "app_home_opened":
        return {"type": "app_home_opened", "user": "U0USER", "channel": "D0HOME", "tab": "home"}
    raise AssertionError(f"no sample of {event_type}: add one")


#: What each event's listener sends Slack when it runs.
ANSWERED_WITH = {
    "app_mention": "chat.postMessage",
    "link_shared": "chat.unfurl",
    "app_home_opened": "views.publish",
}


async def _each_event_is_answered(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, *, socket: bool
) -> None:
    for event_type in sorted(_bot_events()):
        before = len(slack.calls)
        event = _event(slack, bk, event_type)
        if socket:
            await slack.socket_send("events_api", slack_requests.event_callback_payload(event))
        else:
            body, headers = slack_requests.event_callback(event, signing_secret=SIGNING_SECRET)
            assert (await bot.post_slack(body, headers)).status == 200, event_type

        def answered(wanted: str = ANSWERED_WITH[event_type], since: int = before) -> bool:
            return any(c.method == wanted and c.ok for c in slack.calls[since:])

        await slack.wait_for(answered)
        await bot.settled()


async def _each_shortcut_is_answered(bot: BotClient, slack: FakeSlack, *, socket: bool) -> None:
    for shortcut in _manifest()["features"]["shortcuts"]:
        ts = slack.add_message("C0CHAN", "no link here", user="U0USER")
        name, url = bot.new_response_url()
        payload = slack_requests.message_shortcut_payload(
            shortcut["callback_id"], slack.message("C0CHAN", ts), response_url=url
        )
        if socket:
            await slack.socket_send("interactive", payload)
        else:
            body, headers = slack_requests.interactive(payload, signing_secret=SIGNING_SECRET)
            assert (await bot.post_slack(body, headers)).status == 200
        await slack.wait_for(lambda n=name: bot.response_texts(n))  # type: ignore[misc]
        await bot.settled()


def test_the_declared_shortcuts_are_exactly_the_listened_ones() -> None:
    shortcuts = _manifest()["features"]["shortcuts"]
    assert {s["callback_id"] for s in shortcuts} == set(handlers.SHORTCUTS)
    assert all(s["type"] == "message" for s in shortcuts)


def test_the_home_tab_is_on_with_its_event() -> None:
    app_home = _manifest()["features"]["app_home"]
    assert app_home["home_tab_enabled"] is True
    assert "app_home_opened" in _bot_events()


def test_build_links_unfurl_and_only_buildkites() -> None:
    assert _manifest()["features"]["unfurl_domains"] == ["buildkite.com"]
    assert "link_shared" in _bot_events()


async def test_each_subscribed_event_has_a_listener_over_http(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    async with running_bot(slack, bk, redis_url) as bot:
        await _each_event_is_answered(bot, slack, bk, socket=False)
        await _each_shortcut_is_answered(bot, slack, socket=False)
        # An event the manifest does not subscribe to has no listener: Bolt answers 404.
        body, headers = slack_requests.event_callback(
            {"type": "reaction_added", "user": "U0USER", "reaction": "x", "event_ts": "1.2"},
            signing_secret=SIGNING_SECRET,
        )
        assert (await bot.post_slack(body, headers)).status == 404


async def test_each_subscribed_event_has_a_listener_in_socket_mode(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    async with running_bot(slack, bk, redis_url, slack_app_token=slack.app_token) as bot:
        await slack.wait_socket_connected()
        await _each_event_is_answered(bot, slack, bk, socket=True)
        await _each_shortcut_is_answered(bot, slack, socket=True)


def test_socket_mode_and_interactivity_are_on() -> None:
    settings = _manifest()["settings"]
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is True
