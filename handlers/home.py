"""Slack listeners for a person's App Home: `app_home_opened` (publish it), and its buttons and
selects (act as the build message's buttons do, then publish it again).

A Home click has no response_url: its answer (or refusal) opens as a small modal, through the
click's trigger_id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from slack_bolt.async_app import AsyncAck, AsyncApp

from app.core.commands import BuildRef
from app.core.errors import UserError
from app.core.inbox import Done, HomeActions, Inbox, OpenForm
from app.core.services import Services
from app.slack.ids import ActionId
from app.slack.outbox import SlackDeliveryError
from app.slack.payloads import (
    BuildButtonValue,
    LockButtonValue,
    Payload,
    RequestButtonValue,
    action_value,
)
from app.slack.render import home_texts
from app.slack.render.common import modal_notice
from handlers.common import listen
from handlers.errors import error_text
from handlers.mentions import first_delivery

log = logging.getLogger(__name__)
V = TypeVar("V", bound=Payload)

EVENTS = ("app_home_opened",)


def register(app: AsyncApp) -> None:
    listen(
        app,
        events={"app_home_opened": app_home_opened},
        actions={
            ActionId.HOME_CANCEL.value: home_build_button,
            ActionId.HOME_REBUILD.value: home_build_button,
            ActionId.HOME_RETRY.value: home_build_button,
            ActionId.HOME_UNBLOCK.value: home_build_button,
            ActionId.HOME_APPROVE.value: home_decision_button,
            ActionId.HOME_REJECT.value: home_decision_button,
            ActionId.HOME_UNLOCK.value: home_unlock_button,
            ActionId.HOME_DM_MODE.value: home_prefs_select,
            ActionId.HOME_QUIET_FROM.value: home_prefs_select,
            ActionId.HOME_QUIET_TO.value: home_prefs_select,
        },
    )


def _inbox(services: Services) -> Inbox:
    assert services.inbox is not None, "the inbox is wired in app.main"
    return services.inbox


async def app_home_opened(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    await ack()
    event = body.get("event") or {}
    user = event.get("user")
    if event.get("tab") != "home" or not isinstance(user, str) or not user:
        return
    if await first_delivery(services, body):
        await _inbox(services).opened(user)


async def _answer(
    body: dict[str, Any], services: Services, work: Awaitable[Done | OpenForm], *, user: str
) -> None:
    """Run a Home click's work, show its outcome (or its form) in a modal, and publish the Home
    again."""
    try:
        outcome = await work
    except Exception as exc:  # every refusal and failure gets an answer
        outcome = Done(error_text(exc))
    await _show(body, services, outcome)
    try:
        await _inbox(services).publish(user)
    except SlackDeliveryError as exc:
        log.warning("could not republish a Home after a click: %s", exc)


async def _show(body: dict[str, Any], services: Services, outcome: Done | OpenForm) -> None:
    trigger = body.get("trigger_id")
    if not trigger:
        return
    view = (
        outcome.view
        if isinstance(outcome, OpenForm)
        else modal_notice(home_texts.TITLE, outcome.text)
    )
    try:
        await services.outbox.open_view(str(trigger), view)
    except Exception as exc:  # the trigger expired (3 s): the Home shows the new state anyway
        log.warning("could not show a Home answer: %s", type(exc).__name__)


async def _value(body: dict[str, Any], services: Services, model: type[V]) -> V | None:
    """The clicked button's value, or None once a value the bot did not make is answered."""
    try:
        return action_value(body, model)
    except UserError as exc:
        await _show(body, services, Done(exc.text))
        return None


async def home_build_button(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    await ack()
    user = body["user"]
    action = body["actions"][0]
    value = await _value(body, services, BuildButtonValue)
    if value is None:
        return
    ref = BuildRef(value.pipeline, value.number)
    home = HomeActions(services)
    action_id = action.get("action_id")
    if action_id == ActionId.HOME_CANCEL:
        work: Awaitable[Done | OpenForm] = home.cancel(ref, user)
    elif action_id == ActionId.HOME_REBUILD:
        trigger = f"home:{body.get('trigger_id')}:{action.get('action_ts')}:{user['id']}"
        work = home.rebuild(ref, user, trigger=trigger)
    elif action_id == ActionId.HOME_RETRY:
        work = home.retry(ref, user)
    else:
        work = home.unblock(ref, user)
    await _answer(body, services, work, user=str(user["id"]))


async def home_decision_button(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    await ack()
    user = body["user"]
    approve = body["actions"][0].get("action_id") == ActionId.HOME_APPROVE
    request = await _value(body, services, RequestButtonValue)
    if request is None:
        return
    approval_id = request.id
    work = HomeActions(services).decide(approval_id, user, approve=approve)
    await _answer(body, services, work, user=str(user["id"]))


async def home_unlock_button(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    await ack()
    user = body["user"]
    lock = await _value(body, services, LockButtonValue)
    if lock is None:
        return
    pipeline = lock.pipeline
    await _answer(
        body, services, HomeActions(services).unlock(pipeline, user), user=str(user["id"])
    )


async def home_prefs_select(ack: AsyncAck, body: dict[str, Any], services: Services) -> None:
    """A change of the DM preferences: saved, and the Home shows it."""
    await ack()
    user = str(body["user"]["id"])
    action = body["actions"][0]
    chosen = str((action.get("selected_option") or {}).get("value") or "")
    home = HomeActions(services)
    try:
        if action.get("action_id") == ActionId.HOME_DM_MODE:
            await home.set_dm_mode(user, chosen)
        else:
            start = action.get("action_id") == ActionId.HOME_QUIET_FROM
            await home.set_quiet_hour(user, start=start, hour=chosen)
    except UserError as exc:
        await _show(body, services, Done(exc.text))
    await _inbox(services).publish(user)
