"""Can the bot work? One check per thing it depends on, each a line a person can act on.

The same checks serve `/readyz` (Slack and Buildkite checked at start-up and cached, Redis
checked live) and `python -m app --check-config` (everything once, printed). No check's text
ever contains a secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import RedisClusterException, RedisError
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from app.ops.metrics import Metrics
from app.settings import Settings
from app.storage.connection import connect_redis
from app.storage.redis_url import mask_url
from app.storage.store import Store
from buildkite.client import BuildkiteClient
from buildkite.errors import AuthenticationError, BuildkiteError, NotFound

#: The Buildkite token scopes the bot needs (see docs/buildkite-setup.md).
REQUIRED_SCOPES = ("read_builds", "write_builds", "read_pipelines")
CHECK_TIMEOUT = 10.0
REDIS_TIMEOUT = 2.0
#: A failed start-up check is tried again by /readyz at most this often.
RECHECK_AFTER = 30.0

log = logging.getLogger(__name__)

_NETWORK_ERRORS = (aiohttp.ClientError, httpx.HTTPError, OSError, TimeoutError)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


async def bounded(name: str, check: Awaitable[Check], timeout: float = CHECK_TIMEOUT) -> Check:  # noqa: ASYNC109
    try:
        return await asyncio.wait_for(check, timeout)
    except TimeoutError:
        return Check(name, False, f"no answer within {timeout:.0f} s")


async def check_slack(client: AsyncWebClient) -> Check:
    """The bot token, with `auth.test`."""
    try:
        auth = await client.auth_test()
    except SlackApiError as exc:
        error = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        hint = {
            "invalid_auth": ": SLACK_BOT_TOKEN is not a valid token",
            "token_revoked": ": SLACK_BOT_TOKEN was revoked; reinstall the app",
            "account_inactive": ": the app was uninstalled; reinstall it",
            "not_allowed_token_type": ": SLACK_BOT_TOKEN must be the bot token (xoxb-)",
        }.get(str(error), "")
        return Check("slack", False, f"auth.test failed with {error}{hint}")
    except _NETWORK_ERRORS as exc:
        return Check("slack", False, f"cannot reach {client.base_url}: {type(exc).__name__}")
    return Check(
        "slack",
        True,
        f"auth.test ok: bot @{auth.get('user')} ({auth.get('user_id')}) in {auth.get('team')}",
    )


async def check_slack_app_token(settings: Settings) -> Check:
    """The app-level token of Socket Mode, by opening (and dropping) a connection ticket."""
    assert settings.slack_app_token is not None
    client = AsyncWebClient(base_url=str(settings.slack_api_url))
    try:
        await client.apps_connections_open(app_token=settings.slack_app_token.get_secret_value())
    except SlackApiError as exc:
        error = exc.response.get("error") or f"HTTP {exc.response.status_code}"
        return Check("slack app token", False, f"apps.connections.open failed with {error}")
    except _NETWORK_ERRORS as exc:
        return Check("slack app token", False, f"cannot reach Slack: {type(exc).__name__}")
    return Check("slack app token", True, "Socket Mode connections can be opened")


async def check_buildkite(client: BuildkiteClient, *, thorough: bool = True) -> Check:
    """The API token (`GET /v2/access-token`); `thorough` also needs its scopes and the org.

    Readiness only asks for a valid token: a missing scope is reported, to the person who
    asks, by every command that needs it.
    """
    try:
        token = await client.get_access_token()
    except AuthenticationError:
        return Check("buildkite", False, "Buildkite rejected BUILDKITE_API_TOKEN (401)")
    except BuildkiteError as exc:
        return Check("buildkite", False, f"cannot check the token: {exc}")
    missing = [scope for scope in REQUIRED_SCOPES if scope not in token.scopes]
    has = ", ".join(scope for scope in REQUIRED_SCOPES if scope in token.scopes) or "none"
    if missing:
        detail = (
            f"token valid, but it lacks the {', '.join(missing)} scope(s) (has {has}); "
            "add them under Personal Settings → API Access Tokens"
        )
        return Check("buildkite", not thorough, detail)
    if thorough:
        try:
            async for _ in client.list_pipelines(limit=1):
                break
        except NotFound:
            return Check(
                "buildkite",
                False,
                f"organization `{client.org}` not found, or not open to this token "
                "(check BUILDKITE_ORG)",
            )
        except BuildkiteError as exc:
            return Check("buildkite", False, f"cannot list the pipelines of {client.org}: {exc}")
    return Check("buildkite", True, f"token ok for organization {client.org} (scopes {has})")


async def check_redis(store: Store, settings: Settings, *, show_url: bool = False) -> Check:
    """PING the store. `/readyz` is open to anyone, so only `show_url` (the operator's own
    `--check-config`) names the server, its password masked; neither shows an error's text."""
    if settings.redis_url is None:
        where = " (embedded store, REDIS_URL not set)"
    else:
        where = f" ({mask_url(settings.redis_url)})" if show_url else ""
    try:
        await asyncio.wait_for(store.ping(), REDIS_TIMEOUT)
    except RedisAuthenticationError:
        return Check("redis", False, f"PING failed{where}: Redis refused the credentials")
    except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        # RedisClusterException (no node reachable) is not a RedisError.
        return Check("redis", False, f"PING failed{where}: {type(exc).__name__}")
    return Check("redis", True, f"ok{where}")


def check_policy(settings: Settings) -> Check:
    """Load the policy file as start-up would, reporting each problem by line."""
    return check_policy_file(settings.policy_file)


def check_policy_file(path: str) -> Check:
    """The policy check of the file at `path` (POLICY_FILE)."""
    if not path or not Path(path).exists():
        return Check(
            "policy",
            True,
            f"no file at {path}: everyone may deploy, cancel and rebuild every pipeline",
        )
    from app.core.policy import PolicyError, load_policy

    try:
        policy = load_policy(path)
    except PolicyError as exc:
        return Check("policy", False, str(exc))  # one problem a line
    agents = len(policy.data.agents)
    declared = f", {agents} agents (MCP)" if agents else ""
    return Check("policy", True, f"{path}: {len(policy.data.pipelines)} pipeline rules{declared}")


class Readiness:
    """What `/readyz` reports: Slack and Buildkite as checked at start-up, Redis live."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        checks: dict[str, Callable[[], Awaitable[Check]]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.checks = checks
        self.clock = clock
        self.results: dict[str, tuple[Check, float]] = {}

    async def check_at_start(self) -> None:
        names = list(self.checks)
        # Redis is checked live by /readyz, so it is not cached; but start-up names it too.
        redis, *results = await asyncio.gather(
            check_redis(self.store, self.settings, show_url=True),
            *(bounded(n, self.checks[n]()) for n in names),
        )
        now = self.clock()
        self.results = {check.name: (check, now) for check in results}
        for check in [redis, *results]:
            if not check.ok:
                log.error("not ready: %s: %s", check.name, check.detail)

    async def report(self) -> tuple[bool, list[Check]]:
        """Whether the bot is ready, and every check; failed ones are retried now and then."""
        stale = [
            name
            for name, (check, when) in self.results.items()
            if not check.ok and self.clock() - when > RECHECK_AFTER
        ]
        for check in await asyncio.gather(*(bounded(n, self.checks[n]()) for n in stale)):
            self.results[check.name] = (check, self.clock())
        checks = [await check_redis(self.store, self.settings)]
        checks += [check for check, _ in self.results.values()]
        if not self.results:
            checks.append(Check("start-up", False, "start-up checks have not finished"))
        return all(check.ok for check in checks), checks


# -- python -m app --check-config ------------------------------------------------------------


async def check_config(settings: Settings) -> list[Check]:
    """Every check, against the real services, with clients of its own (no retries)."""
    slack = AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(), base_url=str(settings.slack_api_url)
    )
    mode = "Socket Mode" if settings.socket_mode else "HTTP mode"
    storage = "Redis" if settings.redis_url else "embedded store"
    webhooks = (
        ""
        if settings.buildkite_webhook_token
        else "; BUILDKITE_WEBHOOK_TOKEN not set: every webhook is refused (401), builds are "
        "followed by polling"
    )
    checks = [
        Check("settings", True, f"valid ({mode}, port {settings.port}, {storage}){webhooks}"),
        check_policy(settings),
        await bounded("slack", check_slack(slack)),
    ]
    if settings.socket_mode:
        checks.append(await bounded("slack app token", check_slack_app_token(settings)))
    async with BuildkiteClient(
        settings.buildkite_api_token,
        settings.buildkite_org,
        base_url=str(settings.buildkite_api_url),
        max_retries=0,
        max_rate_limit_wait=5,
    ) as buildkite:
        checks.append(await bounded("buildkite", check_buildkite(buildkite)))
    if settings.redis_url is None:
        checks.append(
            Check(
                "redis",
                True,
                "REDIS_URL not set: the embedded in-process store will be used "
                "(tracking is lost on restart; run a single process)",
            )
        )
    else:
        client = connect_redis(settings, Metrics())
        try:
            checks.append(await check_redis(Store(client), settings, show_url=True))
        finally:
            await client.aclose()
    return checks


def report(checks: list[Check], redact: Callable[[str], str]) -> tuple[str, bool]:
    """The human report, one line per check, and whether every check passed."""
    lines = [
        f"{'✓' if c.ok else '✗'} {c.name}: {line}"
        for c in checks
        for line in redact(c.detail).splitlines() or [""]
    ]
    failed = sum(not c.ok for c in checks)
    if failed:
        lines.append(f"{failed} of {len(checks)} checks failed.")
    else:
        lines.append(f"All {len(checks)} checks passed.")
    return "\n".join(lines), not failed
