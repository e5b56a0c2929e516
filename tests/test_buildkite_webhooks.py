"""Webhook verification (token and HMAC signature modes) and payload parsing."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from multidict import CIMultiDict
from pydantic import SecretStr

from app.simulators.buildkite import FakeBuildkite, sign_webhook
from buildkite.errors import WebhookPayloadError, WebhookVerificationError
from buildkite.models import BuildState
from buildkite.webhooks import parse_webhook, sign, verify_webhook

TOKEN = "29b1ff5779c76bd48ba6705eb99ff970"
TIMESTAMP = 1642080837
BODY = b'{"event":"ping","service":{"id":"c9f8372d"},"sender":{"id":"u1","name":"Ada"}}'


def expected_signature(body: bytes = BODY, token: str = TOKEN, timestamp: int = TIMESTAMP) -> str:
    message = f"{timestamp}.".encode() + body
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def signature_header(signature: str, timestamp: int = TIMESTAMP) -> dict[str, str]:
    return {"X-Buildkite-Signature": f"timestamp={timestamp},signature={signature}"}


@pytest.fixture
async def bk() -> AsyncIterator[FakeBuildkite]:
    async with FakeBuildkite() as fake:
        fake.add_pipeline("deploy-prod", block="Ship it?")
        yield fake
        assert fake.unexpected == []


# Signature mode


def test_the_known_vector_verifies() -> None:
    headers = signature_header(expected_signature())

    verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP + 12)
    verify_webhook(headers, BODY, SecretStr(TOKEN), now=TIMESTAMP - 12)
    assert sign(BODY, TOKEN, TIMESTAMP) == expected_signature()


def test_the_fakes_signer_agrees() -> None:
    headers = sign_webhook(BODY, TOKEN, TIMESTAMP, event="ping")

    assert (
        headers["X-Buildkite-Signature"]
        == f"timestamp={TIMESTAMP},signature={expected_signature()}"
    )
    verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP)


def test_header_names_are_case_insensitive() -> None:
    headers = {"x-buildkite-signature": f"timestamp={TIMESTAMP},signature={expected_signature()}"}

    verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP)
    verify_webhook({"X-BUILDKITE-TOKEN": TOKEN}, BODY, TOKEN)


def test_an_uppercase_hex_signature_verifies() -> None:
    verify_webhook(signature_header(expected_signature().upper()), BODY, TOKEN, now=TIMESTAMP)


def test_a_tampered_body_is_rejected() -> None:
    headers = signature_header(expected_signature())

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verify_webhook(headers, BODY.replace(b"Ada", b"Eve"), TOKEN, now=TIMESTAMP)


def test_a_signature_made_with_another_token_is_rejected() -> None:
    headers = signature_header(expected_signature(token="another-token"))

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP)


def test_a_replayed_timestamp_cannot_be_changed() -> None:
    # Re-using an old signature with a fresh timestamp breaks the signature.
    headers = signature_header(expected_signature(), timestamp=TIMESTAMP + 1000)

    with pytest.raises(WebhookVerificationError, match="signature does not match"):
        verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP + 1000)


@pytest.mark.parametrize("offset", [301, -301, 86_400])
def test_a_timestamp_outside_the_tolerance_is_rejected(offset: int) -> None:
    headers = signature_header(expected_signature())

    with pytest.raises(WebhookVerificationError, match="more than 300s from now"):
        verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP + offset)


@pytest.mark.parametrize("offset", [300, -300])
def test_the_tolerance_is_inclusive(offset: int) -> None:
    verify_webhook(signature_header(expected_signature()), BODY, TOKEN, now=TIMESTAMP + offset)


def test_the_tolerance_is_configurable() -> None:
    headers = signature_header(expected_signature())

    with pytest.raises(WebhookVerificationError):
        verify_webhook(headers, BODY, TOKEN, now=TIMESTAMP + 31, tolerance=30)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"signature={'0' * 64}",
        f"timestamp={TIMESTAMP}",
        f"timestamp=abc,signature={'0' * 64}",
        f"timestamp=-5,signature={'0' * 64}",
        f"timestamp={TIMESTAMP},signature=zz",
        f"timestamp={TIMESTAMP},signature={'0' * 63}",
        f"timestamp={TIMESTAMP},signature={'g' * 64}",
        f"timestamp=\uff11\uff12\uff13,signature={'0' * 64}",  # full-width digits
    ],
)
def test_a_malformed_signature_header_is_rejected(value: str) -> None:
    with pytest.raises(WebhookVerificationError, match="is not timestamp=<unix>,signature=<hex>"):
        verify_webhook({"X-Buildkite-Signature": value}, BODY, TOKEN, now=TIMESTAMP)


def test_spaces_around_the_signature_parts_are_tolerated() -> None:
    value = f" timestamp={TIMESTAMP} , signature={expected_signature()} "

    verify_webhook({"X-Buildkite-Signature": value}, BODY, TOKEN, now=TIMESTAMP)


# Token mode and both


def test_the_token_header_verifies() -> None:
    verify_webhook({"X-Buildkite-Token": TOKEN}, BODY, TOKEN)


@pytest.mark.parametrize("sent", ["", "29b1ff5779c76bd48ba6705eb99ff971", TOKEN + " ", "ñ"])
def test_a_wrong_token_is_rejected(sent: str) -> None:
    with pytest.raises(
        WebhookVerificationError, match="X-Buildkite-Token does not match"
    ) as caught:
        verify_webhook({"X-Buildkite-Token": sent}, BODY, TOKEN)

    assert TOKEN not in str(caught.value) + repr(caught.value)


def test_missing_headers_are_rejected() -> None:
    with pytest.raises(WebhookVerificationError, match="neither X-Buildkite-Token nor"):
        verify_webhook(
            {"X-Buildkite-Event": "ping", "Content-Type": "application/json"}, BODY, TOKEN
        )


def test_when_both_are_sent_both_must_verify() -> None:
    good_signature = signature_header(expected_signature())

    verify_webhook({"X-Buildkite-Token": TOKEN, **good_signature}, BODY, TOKEN, now=TIMESTAMP)
    with pytest.raises(WebhookVerificationError, match="X-Buildkite-Token"):
        verify_webhook({"X-Buildkite-Token": "nope", **good_signature}, BODY, TOKEN, now=TIMESTAMP)
    bad_signature = signature_header("0" * 64)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook({"X-Buildkite-Token": TOKEN, **bad_signature}, BODY, TOKEN, now=TIMESTAMP)


def test_two_different_values_for_one_header_are_rejected() -> None:
    headers = CIMultiDict([("X-Buildkite-Token", "nope"), ("x-buildkite-token", TOKEN)])

    with pytest.raises(WebhookVerificationError, match="more than once"):
        verify_webhook(headers, BODY, TOKEN)


def test_an_empty_configured_token_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="no webhook token"):
        verify_webhook({"X-Buildkite-Token": ""}, BODY, "")


# Parsing


def test_a_blocked_build_finished_payload(bk: FakeBuildkite) -> None:
    bk.add_build("deploy-prod", state="passed", blocked=True, meta_data={"chatops_source": "slack"})
    payload = bk.webhook_payload("deploy-prod", 1)
    assert payload["event"] == "build.finished"
    assert "pipeline" not in payload["build"] and "jobs" not in payload["build"]

    event = parse_webhook({"X-Buildkite-Event": "build.finished"}, json.dumps(payload).encode())

    assert event.event == "build.finished"
    assert event.is_build_event
    build = event.build
    assert build is not None
    assert (build.number, build.state, build.blocked) == (1, BuildState.PASSED, True)
    assert not build.is_final and build.is_waiting_on_block
    assert build.jobs == []
    assert build.pipeline_slug == "deploy-prod"  # taken from the payload's pipeline
    assert event.pipeline is not None and event.pipeline.slug == "deploy-prod"
    assert event.sender is not None and event.sender.name == "ChatOps Bot"
    assert build.meta_data == {"chatops_source": "slack"}


def test_a_job_payload_carries_the_job(bk: FakeBuildkite) -> None:
    seeded = bk.add_build("deploy-prod", state="failing", failed_jobs=["Test"])
    payload = bk.job_webhook_payload("deploy-prod", 1, seeded["jobs"][0]["id"])

    event = parse_webhook({}, json.dumps(payload).encode())

    assert event.event == "job.finished"
    assert event.job is not None and (event.job.name, event.job.state) == ("Test", "failed")
    assert event.build is not None and event.build.state is BuildState.FAILING


def test_a_build_that_carries_its_pipeline_keeps_it(bk: FakeBuildkite) -> None:
    build = bk.add_build("deploy-prod", state="running")
    payload = {"event": "build.running", "build": build, "pipeline": {"slug": "other"}}

    event = parse_webhook({}, json.dumps(payload).encode())

    assert event.build is not None and event.build.pipeline_slug == "deploy-prod"


def test_the_header_event_wins_over_the_body() -> None:
    event = parse_webhook({"x-buildkite-event": "ping"}, b'{"event": "build.running"}')

    assert event.event == "ping"
    assert event.build is None and not event.is_build_event


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"{}", "no event name"),
        (b'{"event": "build.finished", "build": {"number": 1}}', "unexpected build"),
        (b'{"event": "build.finished", "build": {"number": "x"}}', "build number"),
    ],
)
def test_payloads_that_cannot_be_understood(body: bytes, reason: str) -> None:
    with pytest.raises(WebhookPayloadError, match=reason):
        parse_webhook({}, body)


# Delivery by the fake to a real receiver


async def test_the_fake_delivers_signed_webhooks(bk: FakeBuildkite) -> None:
    received: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_webhook(request.headers, body, bk.webhook_token)
        except WebhookVerificationError as error:
            return web.Response(status=401, text=error.reason)
        received.append(parse_webhook(request.headers, body).event)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/buildkite/webhook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        url = f"http://127.0.0.1:{port}/buildkite/webhook"
        bk.add_build("deploy-prod", state="running")
        payload = bk.webhook_payload("deploy-prod", 1)

        assert await bk.send_webhook(url, payload, mode="signature") == (200, "ok")
        assert await bk.send_webhook(url, payload) == (200, "ok")
        status, reason = await bk.send_webhook(url, payload, token="wrong")
        assert (status, reason) == (401, "X-Buildkite-Token does not match")
        assert received == ["build.running", "build.running"]
    finally:
        await runner.cleanup()
