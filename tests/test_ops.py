"""Operations: health and readiness, Prometheus metrics, structured logs with correlation ids.

The bot runs on a real port against the Slack and Buildkite fakes, and is observed the way an
operator does: GET /healthz, /readyz and /metrics, and the log lines it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.ops import logs
from app.ops.checks import Check, Readiness
from app.ops.metrics import endpoint_template
from app.settings import Settings
from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage.store import Store

CHANNEL = "C0CHAN"


async def get(bot: BotClient, path: str) -> tuple[int, Any]:
    async with bot.http.get(bot.base + path) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, json.loads(body)
        return resp.status, body.decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(bot: BotClient, until: Callable[[Samples], bool] = bool) -> Samples:
    """Every sample of /metrics, by name and labels (scraped again until `until` holds)."""
    for _ in range(100):
        status, text = await get(bot, "/metrics")
        assert status == 200
        samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        if until(samples):
            break
        await asyncio.sleep(0.05)
    return samples


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def deploy_to_passed(bot: BotClient) -> str:
    """/deploy deploy-prod, then webhooks to passed; returns the build message's ts."""
    await bot.command("/deploy", "deploy-prod")
    post = await bot.slack.wait_for(lambda: bot.slack.posts(CHANNEL))
    ts = str(post[0].response["ts"])
    for state, replies in (("running", 1), ("passed", 2)):
        bot.bk.set_build_state("deploy-prod", 1, state)
        assert (await bot.webhook(bot.bk.webhook_payload("deploy-prod", 1))).status == 200
        await bot.slack.wait_for(lambda: len(bot.slack.thread(CHANNEL, ts)) == replies)  # noqa: B023
    return ts


# -- health and readiness ----------------------------------------------------------------------


async def test_healthz_and_readyz_when_everything_works(bot: BotClient, slack: FakeSlack) -> None:
    assert await get(bot, "/healthz") == (200, {"status": "ok"})
    status, body = await get(bot, "/readyz")
    assert status == 200, body
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"redis", "slack", "buildkite"}
    assert all(check["ok"] for check in body["checks"].values())
    assert "@chatops" in body["checks"]["slack"]["detail"]
    # Slack and Buildkite were asked once, at start-up; Redis is asked on every call.
    await get(bot, "/readyz")
    assert len(slack.calls_to("auth.test")) == 1
    assert len(bot.bk.requests_to("GET", "/v2/access-token")) == 1


async def test_readyz_names_a_rejected_token(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    async with running_bot(
        slack, bk, redis_url, buildkite_api_token="bk-revoked", slack_bot_token="xoxb-revoked"
    ) as bot:
        status, body = await get(bot, "/readyz")
        assert status == 503
        assert body["status"] == "not ready"
        assert body["failing"] == ["slack", "buildkite"]
        assert "invalid_auth" in body["checks"]["slack"]["detail"]
        assert "401" in body["checks"]["buildkite"]["detail"]
        assert body["checks"]["redis"]["ok"] is True
        assert (await get(bot, "/healthz"))[0] == 200  # alive, just not ready
        assert "bk-revoked" not in json.dumps(body)


async def test_readyz_checks_redis_live_and_errors_are_counted(
    slack: FakeSlack, bk: FakeBuildkite
) -> None:
    async with running_bot(slack, bk, f"redis://127.0.0.1:{closed_port()}/0") as bot:
        status, body = await get(bot, "/readyz")
        assert status == 503
        assert body["failing"] == ["redis"]
        assert body["checks"]["redis"]["detail"] == "PING failed: ConnectionError"
        samples = await scrape(bot)
        assert value(samples, "bkchatops_redis_errors_total", error="ConnectionError") >= 1


async def test_a_failed_start_check_is_tried_again_later(redis_url: str, redis_client: Any) -> None:
    answers = iter([False, True])
    now = [0.0]

    async def flaky() -> Check:
        return Check("buildkite", next(answers), "token")

    settings = Settings(
        slack_bot_token="xoxb-test",
        slack_signing_secret="test-signing-secret",
        buildkite_api_token="bk-test-token",
        buildkite_org="acme",
        redis_url=redis_url,
        _env_file=None,
    )
    readiness = Readiness(Store(redis_client), settings, {"buildkite": flaky}, clock=lambda: now[0])
    await readiness.check_at_start()
    assert (await readiness.report())[0] is False
    now[0] = 10.0
    assert (await readiness.report())[0] is False  # not asked again so soon
    now[0] = 31.0
    ready, checks = await readiness.report()
    assert ready is True
    assert [c.name for c in checks] == ["redis", "buildkite"]


# -- metrics -----------------------------------------------------------------------------------


def test_buildkite_endpoints_are_templated() -> None:
    assert (
        endpoint_template("/v2/organizations/acme/pipelines/web/builds/12/jobs/abc/retry", "/v2")
        == "/organizations/{org}/pipelines/{pipeline}/builds/{number}/jobs/{job}/retry"
    )
    assert (
        endpoint_template("/v2/organizations/acme/builds", "/v2") == "/organizations/{org}/builds"
    )
    assert endpoint_template("/v2/access-token", "/v2") == "/access-token"


async def test_metrics_count_what_the_bot_does(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy_to_passed(bot)
    _, name, _ = await bot.command("/deploy", "no-such-pipeline")
    await slack.wait_for(lambda: bot.response_texts(name))
    message = slack.message(CHANNEL, ts)
    await bot.click("build_rebuild", None, channel=CHANNEL, message_ts=ts, message=message)
    await slack.wait_for(lambda: len(bk.builds) == 2)
    await bot.webhook(bk.webhook_payload("deploy-prod", 1), token="wrong-token")

    count = "bkchatops_slack_requests_total"
    samples = await scrape(
        bot, lambda s: value(s, count, kind="action", name="build_rebuild", outcome="ok") == 1
    )
    assert value(samples, count, kind="command", name="/deploy", outcome="ok") == 1
    assert value(samples, count, kind="command", name="/deploy", outcome="user_error") == 1
    assert value(samples, "bkchatops_slack_ack_seconds_count", kind="command", name="/deploy") == 2
    assert value(samples, "bkchatops_slack_ack_seconds_count", kind="action", name="build_rebuild")

    builds = "/organizations/{org}/pipelines/{pipeline}/builds"
    requests = "bkchatops_buildkite_requests_total"
    assert value(samples, requests, method="POST", endpoint=builds, status="201") == 1
    assert value(samples, requests, method="GET", endpoint="/access-token", status="200") == 1
    assert value(samples, "bkchatops_buildkite_rate_limit_remaining") > 0
    # Both of Buildkite's scopes: the organization's and the token user's own.
    scoped = "bkchatops_buildkite_rate_limit_scope_remaining"
    assert value(samples, scoped, scope="organization") > 0
    assert value(samples, scoped, scope="user") > 0
    endpoints = {dict(labels)["endpoint"] for name, labels in samples if name == requests}
    assert not any("acme" in e or "deploy-prod" in e for e in endpoints), endpoints

    calls = "bkchatops_slack_api_calls_total"
    assert value(samples, calls, method="auth.test", status="ok") >= 1
    assert value(samples, calls, method="chat.postMessage", status="ok") >= 3
    assert value(samples, calls, method="response_url", status="ok") >= 1

    transitions = "bkchatops_build_transitions_total"
    assert value(samples, transitions, state="running") == 1
    assert value(samples, transitions, state="passed") == 1
    webhooks = "bkchatops_webhooks_total"
    assert value(samples, webhooks, event="build.finished", result="accepted") == 1
    assert value(samples, webhooks, event="unknown", result="unverified") == 1
    assert value(samples, "bkchatops_poll_cycles_total", outcome="idle") == 1  # at start-up
    assert ("bkchatops_builds_pending", frozenset()) in samples


async def test_an_unexpected_error_is_counted_as_error(
    bot: BotClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(bot.services.buildkite, "get_pipeline", broken)
    await bot.command("/deploy", "deploy-prod")
    count = "bkchatops_slack_requests_total"
    samples = await scrape(bot, lambda s: any(n == count for n, _ in s))
    assert value(samples, count, kind="command", name="/deploy", outcome="error") == 1


async def test_two_bots_in_one_process_keep_their_own_metrics(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, redis_url) as first, running_bot(slack, bk, None) as second:
        await first.command("/deploy", "deploy-prod")
        count = "bkchatops_slack_requests_total"
        ok = {"kind": "command", "name": "/deploy", "outcome": "ok"}
        assert value(await scrape(first, lambda s: value(s, count, **ok) == 1), count, **ok) == 1
        assert value(await scrape(second), count, **ok) == 0


# -- logs --------------------------------------------------------------------------------------


@contextlib.contextmanager
def configured_logs(level: str, secrets: list[str], *, tty: bool = False) -> Iterator[io.StringIO]:
    """The bot's real log configuration, writing into a buffer; pytest's handlers put back."""

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    noisy = {
        name: logging.getLogger(name).level
        for name in ("httpx", "httpcore", "aiohttp.access", "slack_sdk", "slack_bolt")
    }
    stream = Stream()
    logs.configure(level, secrets, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved
        for name, level_before in noisy.items():
            logging.getLogger(name).setLevel(level_before)


async def test_logs_are_json_lines_with_the_correlation_id_shown_to_the_user(
    bot: BotClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        logging.getLogger("app.test").info("about to fail")
        raise RuntimeError("boom")

    monkeypatch.setattr(bot.services.buildkite, "get_pipeline", broken)
    with configured_logs("INFO", []) as stream:
        _, name, _ = await bot.command("/deploy", "deploy-prod")
        await bot.slack.wait_for(lambda: bot.response_texts(name))
    text = bot.response_texts(name)[0]
    ref = text.split("ref `")[1].split("`")[0]
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [e for e in entries if e.get("correlation_id") == ref]
    assert {e["message"].splitlines()[0] for e in mine} >= {
        "about to fail",
        f"unexpected error (ref {ref})",
    }
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert "Traceback" in next(e for e in mine if e["level"] == "error")["message"]


def test_text_lines_on_a_terminal_show_the_correlation_id() -> None:
    with configured_logs("INFO", ["hunter2-secret"], tty=True) as stream:
        logs.new_correlation_id()
        logging.getLogger("app.test").warning("password is hunter2-secret")
    line = stream.getvalue().strip()
    assert line.endswith(f"password is *** [{logs.current_correlation_id()}]")
    assert "WARNING" in line and "{" not in line


def test_the_redis_url_password_is_masked() -> None:
    assert logs.mask_url("redis://bot:s3cret-pw@redis:6379/0") == "redis://bot:***@redis:6379/0"
    assert logs.mask_url("rediss://:s3cret-pw@host/1") == "rediss://:***@host/1"
    assert logs.mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert logs.url_password("redis://:s3cret-pw@host/1") == "s3cret-pw"


async def test_no_secret_is_logged_through_a_whole_deploy_at_debug(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any
) -> None:
    password = "redis-pw-test-only"
    user = "chatops-logtest"
    await redis_client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], categories=["+@all"], keys=["*"]
    )
    url = redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
    bk.add_pipeline("deploy-prod", default_branch="main")
    try:
        async with running_bot(slack, bk, url) as bot:
            secrets = logs.secrets_of(bot.services.settings)
            assert password in secrets
            with configured_logs("DEBUG", secrets) as stream:
                # Even the third parties configure() keeps at INFO: they may echo headers.
                for name in ("httpx", "httpcore", "slack_sdk", "slack_bolt"):
                    logging.getLogger(name).setLevel(logging.DEBUG)
                logging.getLogger("app.test").debug("connecting to %s", url)
                ts = await deploy_to_passed(bot)
                message = slack.message(CHANNEL, ts)
                await bot.click(
                    "build_rebuild", None, channel=CHANNEL, message_ts=ts, message=message
                )
                await slack.wait_for(lambda: len(bk.builds) == 2)
                await bot.command("/cancel", "deploy-prod 2")
                await bot.webhook(bk.webhook_payload("deploy-prod", 1), token="wrong-token")
                await bot.services.poller.poll_once()
                await get(bot, "/readyz")
                await slack.wait_for(lambda: len(slack.responses) >= 2)
    finally:
        await redis_client.acl_deluser(user)
    output = stream.getvalue()
    assert len(output.splitlines()) > 50
    assert '"level": "debug"' in output and "correlation_id" in output
    for secret in [*secrets, url]:
        assert secret not in output, f"a secret reached the logs: {secret[:4]}…"


# -- without Redis -----------------------------------------------------------------------------


async def test_without_redis_url_the_bot_runs_on_the_embedded_store(
    slack: FakeSlack, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture
) -> None:
    bk.add_pipeline("deploy-prod", default_branch="main")
    caplog.set_level(logging.INFO)
    async with running_bot(slack, bk, None) as bot:
        await deploy_to_passed(bot)
        status, body = await get(bot, "/readyz")
        assert status == 200
        assert "embedded store" in body["checks"]["redis"]["detail"]
        assert await bot.services.store.pending() == []
    warnings = [r for r in caplog.records if "REDIS_URL is not set" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "lost on restart" in warnings[0].getMessage()
    assert "only one bot process" in warnings[0].getMessage()


async def test_rate_limit_headers_that_are_not_ascii_numbers_are_ignored() -> None:
    """`"²".isdigit()` is true and `int("²")` fails: a header like that must neither break the
    request it came with nor reach the gauges."""
    import httpx

    from app.ops.metrics import Metrics, count_buildkite_requests

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ok"):
            return httpx.Response(
                200,
                json={},
                headers={"RateLimit-Remaining": "150", "RateLimit-User-Remaining": "7"},
            )
        odd = [
            (b"RateLimit-Remaining", "²".encode()),
            (b"RateLimit-User-Remaining", "٣".encode()),
        ]
        return httpx.Response(200, json={}, headers=odd)

    metrics = Metrics()
    base = "https://api.buildkite.test/v2"
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        count_buildkite_requests(http, metrics, base)
        assert (await http.get(base + "/ok")).status_code == 200
        assert (await http.get(base + "/odd")).status_code == 200
    assert metrics.buildkite_rate_limit_remaining._value.get() == 150
    assert metrics.buildkite_rate_limit_scope_remaining.labels("user")._value.get() == 7
