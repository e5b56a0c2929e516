"""The Redis password, in every REDIS_URL form, never shows: not in /readyz, the logs,
`--check-config` or an exception's text; and a REDIS_URL the bot cannot use stops it with one
line naming REDIS_URL.

The bot runs on its real port against the suite's redis-server, reached through an ACL user
whose password the URL carries in each form redis-py accepts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.ops import logs
from app.ops.checks import check_config, report
from app.ops.logs import mask_url
from app.settings import Settings
from app.simulators.bot import running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.test_ops import configured_logs, deploy_to_passed, get
from tests.test_ops_check_config import child_env, closed_port, main_in_process

USER = "chatops-secrets"
#: Every character that must be percent-encoded in a URL's password, and a recognisable start.
PASSWORD = "pw-Zq@:/%?#&=,+ end"
ENCODED = quote(PASSWORD, safe="")


def forms(host: str, port: int, password: str = PASSWORD) -> dict[str, str]:
    """Every way a REDIS_URL can carry the ACL user's password to one server."""
    encoded = quote(password, safe="")
    return {
        "userinfo": f"redis://{USER}:{encoded}@{host}:{port}/0",
        "query": f"redis://{host}:{port}/0?username={USER}&password={encoded}",
        "query after db": f"redis://{host}:{port}/0?db=0&password={encoded}&username={USER}",
        "user then query": f"redis://{USER}@{host}:{port}/0?password={encoded}",
    }


def unusable_forms(port: int) -> dict[str, str]:
    """Forms pointing at nothing (a closed port): the failure paths."""
    return {
        "default user": f"redis://:{ENCODED}@127.0.0.1:{port}/0",
        "rediss": f"rediss://{USER}:{ENCODED}@127.0.0.1:{port}/0",
        "unix query": f"unix:///nonexistent/redis.sock?password={ENCODED}",
        "sentinel": f"redis+sentinel://:{ENCODED}@127.0.0.1:{port},127.0.0.1:{port}/mymaster/0",
        "sentinel password": (
            f"redis+sentinel://127.0.0.1:{port}/mymaster/0?sentinel_password={ENCODED}"
        ),
        "cluster": f"redis+cluster://{USER}:{ENCODED}@127.0.0.1:{port},127.0.0.1:{port}",
    }


def assert_hidden(text: str, url: str) -> None:
    for secret in (PASSWORD, ENCODED, url, "pw-Zq"):
        assert secret not in text, f"the password reached the output: {text[:300]}"


@pytest.fixture
async def acl_user(redis_client: Any) -> AsyncIterator[None]:
    await redis_client.acl_setuser(
        USER, enabled=True, passwords=[f"+{PASSWORD}"], categories=["+@all"], keys=["*"]
    )
    yield
    await redis_client.acl_deluser(USER)


def server_address(redis_url: str) -> tuple[str, int]:
    parts = urlsplit(redis_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


# -- mask_url over every form ------------------------------------------------------------------

passwords = st.text(
    alphabet=st.sampled_from("abcXYZ019@:/%?#&=,;+ ~!$'()*[]\\\"é"), min_size=1, max_size=24
).map(lambda text: "Zq" + text)
hosts = st.sampled_from(["h", "redis.example", "10.0.0.1", "[::1]"])


@st.composite
def urls(draw: st.DrawFn) -> tuple[str, str]:
    """A REDIS_URL in any form redis-py or the bot accepts, and the password it carries."""
    password = draw(passwords)
    encoded = draw(st.sampled_from([quote(password, safe=""), quote(password, safe=":@")]))
    host, second = draw(hosts), draw(hosts)
    user = draw(st.sampled_from(["", "bot"]))
    url = draw(
        st.sampled_from(
            [
                f"redis://{user}:{encoded}@{host}:6379/0",
                f"redis://{user}:{password}@{host}:6379/0",  # not encoded, as people write it
                f"rediss://{user}:{encoded}@{host}/1",
                f"redis://{host}:6379/0?password={quote(password, safe='')}",
                f"redis://{host}/0?db=1&password={quote(password, safe='')}&username=bot",
                f"unix:///run/redis.sock?db=0&password={quote(password, safe='')}",
                f"unix://{user}:{encoded}@/run/redis.sock",
                f"redis+sentinel://:{encoded}@{host}:26379,{second}:26379/mymaster/0",
                f"redis+sentinel://{quote(password, safe='')}@{host}/mymaster",
                f"redis+sentinel://:{password}@{host}:26379,{second}/mymaster/0",
                f"redis+sentinel://{host}/m/0?sentinel_password={quote(password, safe='')}",
                f"redis+cluster://{user}:{encoded}@{host}:6379,{second}:6380",
                f"redis+cluster://{host}:6379?password={quote(password, safe='')}",
            ]
        )
    )
    return url, password


@settings(max_examples=600, deadline=None)
@given(urls())
def test_mask_url_never_raises_and_never_shows_the_password(case: tuple[str, str]) -> None:
    url, _ = case
    masked = mask_url(url)
    assert "Zq" not in masked, (url, masked)
    assert "***" in masked
    # The same in any text (a log line, an exception's message), for a URL that is one word.
    if not re.search(r"[\s\"'<>`]", url):
        line = logs.RedactSecrets([]).redact(f"cannot connect to {url} (after 3 tries)")
        assert "Zq" not in line, (url, line)


@settings(max_examples=300, deadline=None)
@given(urls())
def test_the_log_redaction_knows_the_password_of_every_form(case: tuple[str, str]) -> None:
    from app.storage.redis_url import url_secrets

    url, password = case
    assert password in url_secrets(url)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_mask_url_takes_any_text(text: str) -> None:
    assert isinstance(mask_url(text), str)
    assert isinstance(mask_url("redis+sentinel://" + text), str)


def test_mask_url_keeps_what_is_not_secret() -> None:
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_url("redis://bot:s3cret@redis:6379/0") == "redis://bot:***@redis:6379/0"
    assert (
        mask_url("redis+sentinel://:pw@a:26379,b:26379/mymaster/0")
        == "redis+sentinel://:***@a:26379,b:26379/mymaster/0"
    )
    assert mask_url("redis://h/0?db=1&password=pw&x=1") == "redis://h/0?db=1&password=***&x=1"


# -- the running bot -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["userinfo", "query", "query after db", "user then query"])
async def test_the_password_never_shows_while_the_bot_works(
    form: str,
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    acl_user: None,
) -> None:
    url = forms(*server_address(redis_url))[form]
    bk.add_pipeline("deploy-prod", default_branch="main")
    async with running_bot(slack, bk, url) as bot:
        secrets = logs.secrets_of(bot.services.settings)
        assert PASSWORD in secrets and ENCODED in secrets
        with configured_logs("DEBUG", secrets) as stream:
            await deploy_to_passed(bot)  # through Redis, so the ACL user's password worked
            status, body = await get(bot, "/readyz")
            # A URL given to a library, or in an exception's text, is masked too.
            logging.getLogger("redis.test").warning("reconnecting to %s", url)
            try:
                raise ConnectionError(f"lost {url}")
            except ConnectionError:
                logging.getLogger("app.test").exception("Redis went away")
    assert status == 200, body
    assert body["checks"]["redis"] == {"ok": True, "detail": "ok"}
    output = stream.getvalue()
    assert "reconnecting to redis://" in output and "Traceback" in output
    assert_hidden(json.dumps(body) + output, url)


@pytest.mark.parametrize("form", ["default user", "rediss", "unix query", "sentinel", "cluster"])
async def test_an_unreachable_redis_names_no_url_in_readyz(
    form: str, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    url = unusable_forms(closed_port())[form]
    # No secret given: the log filter's safety net alone masks the URL.
    with configured_logs("DEBUG", []) as stream:
        async with running_bot(slack, bk, url) as bot:
            status, body = await get(bot, "/readyz")
    assert status == 503
    assert body["failing"] == ["redis"]
    detail = body["checks"]["redis"]["detail"]
    assert detail.startswith("PING failed: "), detail
    assert "://" not in detail and "127.0.0.1" not in detail
    assert_hidden(json.dumps(body) + stream.getvalue(), url)


async def test_a_refused_password_is_said_plainly(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, acl_user: None
) -> None:
    url = forms(*server_address(redis_url), password="pw-Zq-wrong")["query"]
    async with running_bot(slack, bk, url) as bot:
        status, body = await get(bot, "/readyz")
    assert status == 503
    assert body["checks"]["redis"]["detail"] == "PING failed: Redis refused the credentials"
    assert "pw-Zq" not in json.dumps(body)


# -- --check-config and start-up ---------------------------------------------------------------


def app_env(redis_url: str) -> dict[str, str]:
    return child_env(
        SLACK_BOT_TOKEN="xoxb-fake",
        SLACK_SIGNING_SECRET="sign-secret-value",
        SLACK_API_URL=f"http://127.0.0.1:{closed_port()}/api/",
        BUILDKITE_API_TOKEN="bk-secret-value",
        BUILDKITE_API_URL=f"http://127.0.0.1:{closed_port()}/v2",
        BUILDKITE_ORG="acme",
        REDIS_URL=redis_url,
    )


def run_app(tmp_path: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = app_env(redis_url)
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def check_config_run(url: str) -> subprocess.CompletedProcess[str]:
    """What `python -m app --check-config` prints for REDIS_URL=`url` (its report, and its
    logging at ERROR), in this process, beside the other forms' runs."""
    env = {name.lower(): value for name, value in app_env(url).items() if name.isupper()}
    fields: dict[str, Any] = {name: env[name] for name in Settings.model_fields if name in env}
    settings = Settings(_env_file=None, **fields)
    secrets = logs.secrets_of(settings)
    with configured_logs("ERROR", secrets) as stream:
        text, ok = report(await check_config(settings), logs.RedactSecrets(secrets).redact)
    return subprocess.CompletedProcess([], 0 if ok else 1, text + "\n", stream.getvalue())


async def test_check_config_masks_every_form(
    tmp_path: Path, redis_url: str, redis_client: Any, acl_user: None
) -> None:
    host, port = server_address(redis_url)
    cases = {**forms(host, port), **unusable_forms(closed_port())}
    # One form as a real `python -m app --check-config`, beside the failing forms at once; the
    # other working forms one at a time, so that a busy loop never times out their PING.
    first, *working = forms(host, port).values()
    failing = [url for url in cases.values() if url not in forms(host, port).values()]
    results = await asyncio.gather(
        asyncio.to_thread(run_app, tmp_path, first, "--check-config"),
        *(check_config_run(url) for url in failing),
    )
    results[1:1] = [await check_config_run(url) for url in working]
    for (form, url), result in zip(cases.items(), results, strict=True):
        redis_line = next(
            (line for line in result.stdout.splitlines() if "redis:" in line), result.stdout
        )
        if form in forms(host, port):
            assert redis_line.startswith("✓ redis: ok (redis://"), (form, result.stdout)
        else:
            assert redis_line.startswith("✗ redis: PING failed ("), (form, result.stdout)
            assert "***" in redis_line, (form, redis_line)
        assert result.returncode == 1, (form, result.stdout)  # Slack and Buildkite are closed
        assert "Traceback" not in result.stderr, (form, result.stderr)
        assert_hidden(result.stdout + result.stderr, url)


INVALID = {
    "a port that is not a number": ("redis://:pw-Zq@redis:63x9/0", "the port must be a number"),
    "an unknown scheme": ("http://:pw-Zq@redis:6379/0", "must be a redis://"),
    "an empty sentinel host": (
        "redis+sentinel://:pw-Zq@a:26379,,b:26379/mymaster/0",
        "every host must be named",
    ),
    "a sentinel port that is not a number": (
        "redis+sentinel://:pw-Zq@a:26379,b:port/mymaster/0",
        "every port must be a number",
    ),
    "a db that is not a number": ("redis://:pw-Zq@redis:6379/zero", "must be the database"),
    "a db option that is not a number": (
        "redis://redis:6379?password=pw-Zq&db=x",
        "the database must be a number",
    ),
    "an unknown option": ("redis://redis:6379/0?password=pw-Zq&timout=5", "unknown option"),
    "several hosts on one server": ("redis://:pw-Zq@a:6379,b:6379/0", "several hosts"),
    "a cluster db": ("redis+cluster://:pw-Zq@a:6379/3", "only database 0"),
    "an unencoded / in the password": ("redis://:pw-Zq/x@redis:6379/0", "percent-encoded"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_an_unusable_redis_url_stops_start_up_with_one_line(
    case: str, tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url, reason = INVALID[case]
    if case == next(iter(INVALID)):  # one case as real processes: exit codes and streams
        started = run_app(tmp_cwd, url)
        checked = run_app(tmp_cwd, url, "--check-config")
    else:
        env = app_env(url)
        started = main_in_process(env, monkeypatch=monkeypatch, capsys=capsys)
        checked = main_in_process(env, "--check-config", monkeypatch=monkeypatch, capsys=capsys)

    assert started.returncode == 2, started.stderr
    problems = [line for line in started.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1, started.stderr
    assert problems[0].startswith("  - REDIS_URL is invalid: ") and reason in problems[0]
    assert checked.returncode == 1
    failed = [line for line in checked.stdout.splitlines() if line.startswith("✗")]
    assert failed == [f"✗ settings: {problems[0].removeprefix('  - ')}"]
    for result in (started, checked):
        assert "Traceback" not in result.stdout + result.stderr
        assert "pw-Zq" not in result.stdout + result.stderr


@pytest.mark.parametrize("form", ["default user", "sentinel", "cluster"])
async def test_an_unreachable_redis_answers_webhooks_503_in_every_topology(
    form: str, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    # redis-py raises RedisClusterException, which is no RedisError, when no cluster node
    # answers: it must still read as "Redis is unavailable", never as a 500.
    url = unusable_forms(closed_port())[form]
    bk.add_pipeline("deploy-prod", default_branch="main")
    bk.add_build("deploy-prod", state="running")
    with configured_logs("DEBUG", []) as stream:
        async with running_bot(slack, bk, url) as bot:
            response = await bot.webhook(bk.webhook_payload("deploy-prod", 1))
            answer = json.loads(await response.text())
    assert response.status == 503, answer
    assert answer == {"error": "tracking unavailable"}
    assert "Traceback" not in stream.getvalue(), stream.getvalue()[-3000:]
    assert_hidden(stream.getvalue(), url)
