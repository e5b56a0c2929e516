"""The fake Slack behaves like Slack for the real slack_sdk and slack_bolt clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import pytest
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from app.simulators.slack import FakeSlack
from app.simulators.slack_requests import (
    block_action,
    block_action_payload,
    slash_command,
    slash_command_payload,
    view_submission,
    view_submission_payload,
)

SECTION = {"type": "section", "text": {"type": "mrkdwn", "text": "*Deploying* api"}}
APPROVE_BUTTONS = {
    "type": "actions",
    "block_id": "deploy_actions",
    "elements": [
        {
            "type": "button",
            "action_id": "approve",
            "text": {"type": "plain_text", "text": "Approve"},
            "value": '{"build": 42}',
            "style": "primary",
        }
    ],
}


def _bolt_request(body: bytes, headers: dict[str, str]) -> AsyncBoltRequest:
    """What Bolt's HTTP adapters build from an incoming POST."""
    return AsyncBoltRequest(body=body.decode(), headers={**headers})


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake
        assert fake.unexpected == [], fake.describe()


@pytest.fixture
def client(fake: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token=fake.bot_token, base_url=fake.api_url)


async def test_web_client_calls_are_answered_and_recorded(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    auth = await client.auth_test()
    assert (auth["team_id"], auth["user_id"], auth["bot_id"]) == ("T0001", "U0BOT", "B0BOT")

    root = await client.chat_postMessage(channel="C0CHAN", text="Deploying api", blocks=[SECTION])
    reply = await client.chat_postMessage(
        channel="C0CHAN", thread_ts=root["ts"], text="failed", reply_broadcast=True
    )
    await client.chat_update(channel="C0CHAN", ts=root["ts"], text="Deployed", blocks=[])
    ephemeral = await client.chat_postEphemeral(channel="C0CHAN", user="U0USER", text="only you")
    user = await client.users_info(user="U0USER")

    assert root["ts"] < reply["ts"] < ephemeral["message_ts"]
    assert user["user"]["profile"]["email"] == "alice@example.com"

    [post, _] = fake.posts("C0CHAN")
    assert post.args["blocks"] == [SECTION]
    assert post.content_type == "application/json"  # slack_sdk sends chat.* as JSON
    assert post.headers["Authorization"] == "Bearer xoxb-test"
    assert fake.updates()[0].args == {
        "channel": "C0CHAN",
        "ts": root["ts"],
        "text": "Deployed",
        "blocks": [],
    }
    assert fake.ephemerals("U0USER")[0].args["text"] == "only you"
    assert fake.calls_to("users.info")[0].args == {"user": "U0USER"}  # GET query string

    message = fake.message("C0CHAN", root["ts"])
    assert (message["text"], message["blocks"], message["reply_count"]) == ("Deployed", [], 1)
    [threaded] = fake.thread("C0CHAN", root["ts"])
    assert (threaded["text"], threaded["reply_broadcast"]) == ("failed", True)
    assert [m["ts"] for m in fake.history("C0CHAN")] == [root["ts"], reply["ts"]]


async def test_form_encoded_json_strings_and_flags_are_decoded(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    root = fake.add_message("C0CHAN", "root")
    await client.api_call(
        "chat.postMessage",
        data={
            "channel": "#deploys",
            "thread_ts": root,
            "blocks": json.dumps([SECTION]),
            "reply_broadcast": "1",
        },
    )
    [call] = fake.posts("C0CHAN")
    assert call.content_type == "application/x-www-form-urlencoded"
    assert call.args["blocks"] == [SECTION]
    assert call.args["reply_broadcast"] is True
    assert fake.thread("C0CHAN", root)[0]["blocks"] == [SECTION]


async def test_slack_errors(fake: FakeSlack, client: AsyncWebClient) -> None:
    with pytest.raises(SlackApiError) as missing:
        await client.chat_update(channel="C0CHAN", ts="1.000000", text="x")
    assert missing.value.response["error"] == "message_not_found"

    with pytest.raises(SlackApiError) as unknown_email:
        await client.users_lookupByEmail(email="nobody@example.com")
    assert unknown_email.value.response["error"] == "users_not_found"

    fake.fail_next("chat.postMessage", "channel_not_found")
    with pytest.raises(SlackApiError) as injected:
        await client.chat_postMessage(channel="C0CHAN", text="hi")
    assert (injected.value.response.status_code, injected.value.response["error"]) == (
        200,
        "channel_not_found",
    )
    assert fake.posts() == []

    wrong = AsyncWebClient(token="xoxb-wrong", base_url=fake.api_url)
    with pytest.raises(SlackApiError) as bad_auth:
        await wrong.auth_test()
    assert bad_auth.value.response["error"] == "invalid_auth"


async def test_rate_limit_is_retried_by_the_sdk_handler(fake: FakeSlack) -> None:
    client = AsyncWebClient(
        token=fake.bot_token,
        base_url=fake.api_url,
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)],
    )
    fake.fail_next("chat.postMessage", retry_after=0)

    response = await client.chat_postMessage(channel="C0CHAN", text="hi")

    assert response["ok"]
    attempts = fake.calls_to("chat.postMessage")
    assert [(c.status, c.response.get("error")) for c in attempts] == [
        (429, "ratelimited"),
        (200, None),
    ]
    assert len(fake.history("C0CHAN")) == 1


async def test_unexpected_requests_are_recorded(fake: FakeSlack, client: AsyncWebClient) -> None:
    with pytest.raises(SlackApiError) as unknown:
        await client.api_call("chat.delete", json={"channel": "C0CHAN", "ts": "1.0"})
    assert (unknown.value.response.status_code, unknown.value.response["error"]) == (
        404,
        "unknown_method",
    )
    async with aiohttp.ClientSession() as session, session.get(f"{fake.base_url}/nope") as r:
        assert r.status == 404
    with pytest.raises(SlackApiError):
        await client.chat_postMessage(channel="C0CHAN", text="x", blocks=[{"text": "no type"}])

    assert len(fake.unexpected) == 3, fake.unexpected
    assert "chat.delete" in fake.unexpected[0]
    assert "/nope" in fake.unexpected[1]
    assert "no type" in fake.unexpected[2]
    fake.unexpected.clear()


async def test_response_url_posts_are_recorded_and_applied(fake: FakeSlack) -> None:
    ts = fake.add_message("C0CHAN", "Deploy api?", blocks=[APPROVE_BUTTONS])
    url = fake.response_url("approve", channel="C0CHAN", message_ts=ts)

    webhook = AsyncWebhookClient(url)
    await webhook.send(text="Approved by alice", replace_original=True)
    await webhook.send(text="Deploy started", response_type="in_channel")

    assert [r.json["text"] for r in fake.responses] == ["Approved by alice", "Deploy started"]
    assert fake.message("C0CHAN", ts)["text"] == "Approved by alice"
    assert fake.message("C0CHAN", ts)["blocks"] == []
    assert fake.history("C0CHAN")[-1]["text"] == "Deploy started"


async def test_blocks_too_large_in_all_are_refused_as_slack_does(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    # Each block is within its own limit; together they are over what Slack takes.
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "x" * 2900}}
    with pytest.raises(SlackApiError) as too_long:
        await client.chat_postMessage(channel="C0CHAN", text="big", blocks=[section] * 5)
    assert too_long.value.response["error"] == "msg_blocks_too_long"
    assert fake.posts() == []
    await client.chat_postMessage(channel="C0CHAN", text="fits", blocks=[section] * 4)

    url = fake.response_url("big", channel="C0CHAN")
    response = await AsyncWebhookClient(url).send(text="big", blocks=[section] * 5)
    assert response.status_code == 400
    # Both are recorded as unexpected too: a bot should never send them.
    assert fake.unexpected == [
        "chat.postMessage: blocks of 14,805 characters in all",
        "response_url big: msg_blocks_too_long",
    ]
    fake.unexpected.clear()


async def test_views_open_and_update(fake: FakeSlack, client: AsyncWebClient) -> None:
    modal = {
        "type": "modal",
        "callback_id": "deploy_modal",
        "title": {"type": "plain_text", "text": "Deploy"},
        "blocks": [SECTION],
        "private_metadata": '{"pipeline": "api"}',
    }
    opened = await client.views_open(trigger_id="123.456.abc", view=modal)
    view_id = opened["view"]["id"]
    await client.views_update(view_id=view_id, view={**modal, "blocks": []})

    assert fake.views[view_id]["callback_id"] == "deploy_modal"
    assert fake.views[view_id]["blocks"] == []
    with pytest.raises(SlackApiError) as reused:
        await client.views_open(trigger_id="123.456.abc", view=modal)
    assert reused.value.response["error"] == "exchanged_trigger_id"

    payload = view_submission_payload(
        "deploy_modal",
        {"env": {"env": "production"}},
        '{"pipeline": "api"}',
        view=fake.views[view_id],
    )
    assert payload["view"]["id"] == view_id
    assert payload["view"]["state"]["values"]["env"]["env"] == {
        "type": "plain_text_input",
        "value": "production",
    }


async def test_socket_mode_round_trip_with_bolt(fake: FakeSlack) -> None:
    app = AsyncApp(client=AsyncWebClient(token=fake.bot_token, base_url=fake.api_url))

    @app.command("/deploy")
    async def deploy(ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack(f"Deploying {command['text']}")

    @app.action("approve")
    async def approve(ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient) -> None:
        await ack()
        await client.chat_update(
            channel=body["channel"]["id"],
            ts=body["message"]["ts"],
            text=body["actions"][0]["value"],
        )

    handler = AsyncSocketModeHandler(
        app,
        fake.app_token,
        web_client=AsyncWebClient(token=fake.app_token, base_url=fake.api_url),
    )
    await handler.connect_async()  # type: ignore[no-untyped-call]
    try:
        await fake.wait_socket_connected()
        command = slash_command_payload(
            "/deploy", "api production", response_url=fake.response_url("deploy")
        )
        assert await fake.socket_send("slash_commands", command) == {
            "text": "Deploying api production"
        }

        ts = fake.add_message("C0CHAN", "Deploy api?", blocks=[APPROVE_BUTTONS])
        click = block_action_payload(
            "approve", message=fake.message("C0CHAN", ts), response_url=fake.response_url("click")
        )
        assert await fake.socket_send("interactive", click) is None
        await fake.wait_for(lambda: fake.message("C0CHAN", ts)["text"] == '{"build": 42}')
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]

    await fake.wait_for(lambda: not fake.socket_connected)
    [connect] = fake.calls_to("apps.connections.open")
    assert connect.headers["Authorization"] == "Bearer xapp-test"
    assert fake.calls_to("auth.test")[0].headers["Authorization"] == "Bearer xoxb-test"
    assert len(fake.acks) == 2
    await asyncio.sleep(0)  # let the SDK's cancelled background tasks finish


async def test_signed_requests_verify_with_the_sdk_verifier() -> None:
    verifier = SignatureVerifier("s3cret")
    body, headers = slash_command(
        "/deploy", "api", response_url="http://x/r", signing_secret="s3cret"
    )
    assert verifier.is_valid_request(body, headers)
    fields = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    assert (fields["command"], fields["text"], fields["channel_id"]) == ("/deploy", "api", "C0CHAN")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"

    stale, stale_headers = slash_command(
        "/deploy",
        "api",
        response_url="http://x/r",
        signing_secret="s3cret",
        timestamp=int(time.time()) - 600,
    )
    assert not verifier.is_valid_request(stale, stale_headers)

    click, click_headers = block_action(
        "approve",
        message_ts="1.000100",
        message_blocks=[APPROVE_BUTTONS],
        response_url="http://x/r",
        signing_secret="s3cret",
    )
    assert verifier.is_valid_request(click, click_headers)
    payload = json.loads(parse_qs(click.decode())["payload"][0])
    assert payload["type"] == "block_actions"
    assert payload["container"] == {
        "type": "message",
        "message_ts": "1.000100",
        "channel_id": "C0CHAN",
        "is_ephemeral": False,
    }
    assert payload["actions"][0]["value"] == '{"build": 42}'  # copied from the button
    assert payload["actions"][0]["block_id"] == "deploy_actions"


async def test_signed_requests_are_dispatched_by_bolt(fake: FakeSlack) -> None:
    app = AsyncApp(
        signing_secret="s3cret",
        client=AsyncWebClient(token=fake.bot_token, base_url=fake.api_url),
    )
    seen: list[str] = []

    @app.command("/deploy")
    async def deploy(ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack(f"Deploying {command['text']}")

    @app.action("approve")
    async def approve(ack: AsyncAck, action: dict[str, Any]) -> None:
        await ack()
        seen.append(action["value"])

    @app.view("deploy_modal")
    async def submit(ack: AsyncAck, view: dict[str, Any]) -> None:
        await ack()
        seen.append(view["state"]["values"]["env"]["env"]["value"])

    url = fake.response_url("r")
    requests = [
        slash_command("/deploy", "api", response_url=url, signing_secret="s3cret"),
        block_action(
            "approve",
            message_ts="1.000100",
            message_blocks=[APPROVE_BUTTONS],
            response_url=url,
            signing_secret="s3cret",
        ),
        view_submission("deploy_modal", {"env": {"env": "production"}}, signing_secret="s3cret"),
    ]
    responses = [await app.async_dispatch(_bolt_request(*request)) for request in requests]

    assert [r.status for r in responses] == [200, 200, 200]
    assert responses[0].body == "Deploying api"
    await fake.wait_for(lambda: len(seen) == 2)
    assert seen == ['{"build": 42}', "production"]

    forged_body, forged_headers = slash_command(
        "/deploy", "api", response_url=url, signing_secret="wrong"
    )
    forged = await app.async_dispatch(_bolt_request(forged_body, forged_headers))
    assert forged.status == 401


async def test_history_and_replies_page_and_show_metadata_only_when_asked(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    marked = {"event_type": "bkchatops_post", "event_payload": {"key": "b1:C0CHAN:root"}}
    before = time.time()
    root = await client.chat_postMessage(channel="C0CHAN", text="root", metadata=marked)
    for i in range(3):
        await client.chat_postMessage(channel="C0CHAN", text=f"top {i}")
    await client.chat_postMessage(channel="C0CHAN", text="reply", thread_ts=root["ts"])
    assert float(root["ts"]) >= before - 1  # ts values are the current time, as in Slack

    first = await client.conversations_history(
        channel="C0CHAN", limit=2, include_all_metadata=True, oldest=str(before - 1)
    )
    assert [m["text"] for m in first["messages"]] == ["top 2", "top 1"]  # newest first
    assert first["has_more"] is True
    cursor = first["response_metadata"]["next_cursor"]
    rest = await client.conversations_history(
        channel="C0CHAN", limit=2, include_all_metadata=True, cursor=cursor
    )
    assert [m["text"] for m in rest["messages"]] == ["top 0", "root"]
    assert rest["messages"][1]["metadata"] == marked
    assert rest["response_metadata"]["next_cursor"] == ""
    plain = await client.conversations_history(channel="C0CHAN")
    assert all("metadata" not in m for m in plain["messages"])
    later = await client.conversations_history(channel="C0CHAN", oldest=str(time.time() + 60))
    assert later["messages"] == []

    thread = await client.conversations_replies(channel="C0CHAN", ts=root["ts"])
    assert [m["text"] for m in thread["messages"]] == ["root", "reply"]
    with pytest.raises(SlackApiError) as missing:
        await client.conversations_replies(channel="C0CHAN", ts="1.000001")
    assert missing.value.response["error"] == "thread_not_found"


async def test_a_dropped_answer_still_carries_out_the_call(fake: FakeSlack) -> None:
    client = AsyncWebClient(token=fake.bot_token, base_url=fake.api_url, retry_handlers=[])
    fake.drop_answer_next("chat.postMessage")
    with pytest.raises(aiohttp.ClientError):
        await client.chat_postMessage(channel="C0CHAN", text="lost answer")
    assert [m["text"] for m in fake.history("C0CHAN")] == ["lost answer"]
    assert fake.calls_to("chat.postMessage")[0].answer_lost is True
    again = await client.chat_postMessage(channel="C0CHAN", text="answered")
    assert again["ok"] is True


async def test_posting_needs_the_bot_in_the_channel_as_slack_does(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    fake.add_channel("C0PUB", "elsewhere", is_member=False)
    fake.add_channel("C0PRIV", "secret", is_private=True, is_member=False)
    # chat:write.public (asked for by manifest.yml) covers public channels, not private ones.
    await client.chat_postMessage(channel="C0PUB", text="hi")
    for method in (client.chat_postMessage, client.chat_postEphemeral):
        with pytest.raises(SlackApiError) as hidden:
            await method(channel="C0PRIV", text="hi", user="U0USER")
        assert hidden.value.response["error"] == "channel_not_found"

    fake.scopes = fake.scopes - {"chat:write.public"}
    for method in (client.chat_postMessage, client.chat_postEphemeral):
        with pytest.raises(SlackApiError) as outside:
            await method(channel="C0PUB", text="hi", user="U0USER")
        assert outside.value.response["error"] == "not_in_channel"
    # The seeded channel (and any a test never seeded) has the bot in it.
    await client.chat_postMessage(channel="C0CHAN", text="hi")
    await client.chat_postMessage(channel="C0UNSEEDED", text="hi")

    fake.add_bot_to("C0PRIV")
    fake.add_bot_to("C0PUB")
    await client.chat_postMessage(channel="C0PRIV", text="invited")
    await client.chat_postMessage(channel="C0PUB", text="invited")
    fake.remove_bot_from("C0PUB")
    with pytest.raises(SlackApiError):
        await client.chat_postMessage(channel="C0PUB", text="removed")
    assert [c.args["text"] for c in fake.posts()] == ["hi", "hi", "hi", "invited", "invited"]


async def test_a_click_in_an_ephemeral_message_has_no_message() -> None:
    payload = block_action_payload(
        "approve",
        message_ts="1.000200",
        message_blocks=[APPROVE_BUTTONS],
        thread_ts="1.000100",
        response_url="http://x/r",
        ephemeral=True,
    )
    assert "message" not in payload
    assert payload["container"] == {
        "type": "message",
        "message_ts": "1.000200",
        "channel_id": "C0CHAN",
        "is_ephemeral": True,
    }
    assert payload["channel"] == {"id": "C0CHAN", "name": "deploys"}
    assert payload["actions"][0]["value"] == '{"build": 42}'  # still copied from the button
    with pytest.raises(ValueError, match="no element"):
        block_action_payload(
            "reject",
            message_ts="1.000200",
            message_blocks=[APPROVE_BUTTONS],
            response_url="http://x/r",
            ephemeral=True,
        )


async def test_an_ephemeral_message_is_edited_only_through_its_response_url(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    posted = await client.chat_postEphemeral(channel="C0CHAN", user="U0USER", text="Confirm?")
    ts = posted["message_ts"]
    assert fake.ephemeral_messages["C0CHAN"][ts]["user"] == "U0USER"
    assert ts not in fake.messages.get("C0CHAN", {})  # never in the channel's history

    with pytest.raises(SlackApiError) as update:
        await client.chat_update(channel="C0CHAN", ts=ts, text="Started")
    assert update.value.response["error"] == "message_not_found"
    await client.chat_postMessage(channel="C0CHAN", thread_ts=ts, text="lost reply")
    assert fake.unexpected == [
        f"chat.update: chat.update of ephemeral message {ts}",
        f"reply in C0CHAN threaded under ephemeral {ts}",
    ]
    fake.unexpected.clear()

    clicked = fake.add_ephemeral("C0CHAN", "U0USER", "Deploy api?", blocks=[APPROVE_BUTTONS])
    url = fake.response_url("confirm", channel="C0CHAN", message_ts=clicked)
    await AsyncWebhookClient(url).send(text="Started", replace_original=True)
    assert fake.ephemeral_messages["C0CHAN"][clicked]["text"] == "Started"
    await AsyncWebhookClient(url).send(text="", delete_original=True)
    assert clicked not in fake.ephemeral_messages["C0CHAN"]


@pytest.mark.parametrize("channel", ["C0CHAN", "C0NOTIFY", "C0OTHER", "C0OPS", "C0POLL"])
async def test_each_channel_the_tests_post_in_refuses_once_the_bot_is_out(
    fake: FakeSlack, client: AsyncWebClient, channel: str
) -> None:
    await client.chat_postMessage(channel=channel, text="member by default")
    fake.remove_bot_from(channel)
    fake.scopes = fake.scopes - {"chat:write.public"}
    with pytest.raises(SlackApiError) as outside:
        await client.chat_postMessage(channel=channel, text="hi")
    assert outside.value.response["error"] == "not_in_channel"
    fake.channels[channel]["is_private"] = True
    with pytest.raises(SlackApiError) as hidden:
        await client.chat_postMessage(channel=channel, text="hi")
    assert hidden.value.response["error"] == "channel_not_found"
    assert len(fake.posts(channel)) == 1
