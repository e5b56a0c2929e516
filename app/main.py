"""Wiring: factories that build the bot from settings, and the process's start-up and shutdown.

Nothing is created at import time. `run(settings)` starts one process in Socket Mode when
SLACK_APP_TOKEN is set, otherwise as an HTTP server; both serve the webhook and health routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.web_log import AccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncApp, AsyncBoltRequest
from slack_bolt.middleware.async_middleware import AsyncMiddleware
from slack_bolt.response import BoltResponse
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

import handlers
from app.agents.gateway import create_gateway
from app.agents.http import McpEndpoint
from app.agents.identity import Agent
from app.clients import buildkite_http, create_buildkite_client
from app.core.approvals import Approvals
from app.core.audit import Auditor
from app.core.auto_retry import AutoRetry
from app.core.deploy_queue import DeployQueue
from app.core.digest import run_digest_schedules
from app.core.freeze_announcements import FreezeAnnouncer, sweep_every
from app.core.inbox import DirectMessages, Inbox
from app.core.ledger_followup import LedgerFollowUp
from app.core.lock_hygiene import LockHygiene
from app.core.policy import load_policy
from app.core.releases import LedgerRecorder
from app.core.routing import Router
from app.core.services import Services
from app.core.supersede import StaleBlocks
from app.core.unfurls import LiveUnfurls
from app.ops.checks import Readiness, check_buildkite, check_slack
from app.ops.metrics import CountSlackCalls, Metrics, count_buildkite_requests
from app.ops.observability import SlackRequestObserver
from app.ops.outages import RedisOutage
from app.ops.shutdown import FLOOR as shutdown_floor
from app.ops.shutdown import StopBudget
from app.settings import Settings
from app.slack import mrkdwn
from app.slack.clicks import DropReplayedClicks
from app.slack.directory import Directory
from app.slack.outbox import Outbox
from app.slack.response_urls import SlackHooks
from app.storage.connection import connect_redis
from app.storage.redis_url import mask_url
from app.storage.store import Store
from app.tracking.intake import Intake
from app.tracking.notifier import Notifier
from app.tracking.phases import process_name
from app.tracking.poller import Poller
from app.tracking.writer import MessageWriter
from app.tuning import DEFAULT, Tuning
from app.web import OnlyVerified, create_web_app
from handlers.errors import report_bolt_error

if TYPE_CHECKING:
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

log = logging.getLogger(__name__)

#: slack_sdk's default timeout for a Web API call (a shared session brings its own).
SLACK_TIMEOUT = 30.0


def create_slack_session() -> aiohttp.ClientSession:
    """One connection pool for every Slack Web API call of the process.

    Without it slack_sdk opens (and closes) a session, so a new TCP/TLS connection, per call.
    Create it inside the running loop and close it at shutdown (slack_sdk never closes it).
    """
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SLACK_TIMEOUT))


def create_slack_client(
    settings: Settings, session: aiohttp.ClientSession | None = None
) -> AsyncWebClient:
    """The bot's Web API client, retrying connection errors, 5xx and 429 (after Retry-After).

    Pass the process's shared `session` so calls reuse connections (Bolt's per-request clients
    inherit it too).
    """
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=str(settings.slack_api_url),
        session=session,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncRateLimitErrorRetryHandler(max_retry_count=5),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ],
    )


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, metrics: Metrics | None = None, tuning: Tuning = DEFAULT
) -> AsyncIterator[Services]:
    """Create the process's shared clients (one pool each) and close them on the way out.

    Without REDIS_URL the store is embedded in the process (see app.storage.connection).
    """
    metrics = metrics if metrics is not None else Metrics()
    policy = load_policy(settings.policy_file)  # first: a bad file leaves no client unclosed
    mrkdwn.trust_web_host(str(settings.buildkite_api_url))
    # Each client is closed on the way out, also when a later one fails to be created.
    async with contextlib.AsyncExitStack() as closing:
        http = buildkite_http(settings)
        closing.push_async_callback(http.aclose)
        count_buildkite_requests(http, metrics, str(settings.buildkite_api_url))
        redis_client = connect_redis(settings, metrics)
        closing.push_async_callback(redis_client.aclose)
        buildkite = create_buildkite_client(settings, http)
        closing.push_async_callback(buildkite.aclose)
        slack_session = create_slack_session()
        closing.push_async_callback(slack_session.close)
        slack = create_slack_client(settings, slack_session)
        slack.retry_handlers.insert(0, CountSlackCalls(metrics))
        store = Store(redis_client, tuning)
        outbox = Outbox(
            slack,
            post_interval=tuning.slack.post_interval,
            edit_interval=tuning.slack.edit_interval,
        )
        # First out: edits need the Slack session.
        stopping = StopBudget(tuning.shutdown_grace)
        closing.push_async_callback(_drain, outbox, stopping)
        directory = Directory(slack)
        hooks = SlackHooks(settings.slack_hooks_url, outbox, metrics)
        auditor = Auditor(store)
        intake = Intake(store, buildkite)
        auto_retry = AutoRetry(
            policy, store, buildkite, outbox, auditor, follow=intake.reopen, clock=tuning.clock
        )
        ledger = LedgerRecorder(policy, store, buildkite)
        consumer = process_name()  # its stream consumer and its poll lease
        redis_outage = RedisOutage(
            mask_url(settings.redis_url) if settings.redis_url else "the embedded store",
            repeat_every=tuning.redis_outage_log_every,
        )
        writer = MessageWriter(store, buildkite, outbox, hooks, tuning.tracking, people=directory)
        stale_blocks = StaleBlocks(
            policy,
            store,
            buildkite,
            outbox,
            auditor,
            observe=intake.observe,
            clock=tuning.clock,
            lease=tuning.sweeps.superseded_lease,
        )
        inbox = Inbox(
            store=store,
            outbox=outbox,
            policy=policy,
            directory=directory,
            settings=settings,
            tuning=tuning.inbox,
            clock=tuning.clock,
        )
        closing.push_async_callback(inbox.close)  # before the outbox drains
        dms = DirectMessages(
            store=store, outbox=outbox, directory=directory, inbox=inbox, clock=tuning.clock
        )
        notifier = Notifier(
            store,
            writer,
            tuning.tracking,
            metrics=metrics,
            on_final=[auto_retry.on_final, ledger.on_final],
            on_change=[
                stale_blocks.on_change,
                inbox.on_change,
                dms.on_change,
                LiveUnfurls(
                    store=store, outbox=outbox, policy=policy, directory=directory
                ).on_change,
            ],
            consumer=consumer,
            redis_outage=redis_outage,
        )
        poller = Poller(
            store,
            buildkite,
            intake,
            tuning.tracking,
            poll_interval=settings.poll_interval,
            metrics=metrics,
            consumer=consumer,
            redis_outage=redis_outage,
        )
        yield Services(
            settings=settings,
            http=http,
            redis=redis_client,
            buildkite=buildkite,
            store=store,
            outbox=outbox,
            tracker=intake,
            notifier=notifier,
            poller=poller,
            policy=policy,
            directory=directory,
            auditor=auditor,
            router=Router(intake, store, policy, on_deploy=ledger.on_route_build),
            hooks=hooks,
            tuning=tuning,
            deploys=DeployQueue(running=tuning.deploys.running, waiting=tuning.deploys.waiting),
            redis_outage=redis_outage,
            stopping=stopping,
            inbox=inbox,
            dms=dms,
        )


async def _drain(outbox: Outbox, stopping: StopBudget) -> None:
    try:
        await asyncio.wait_for(outbox.drain(), timeout=stopping.left())
    except TimeoutError:
        log.warning("shutdown: some Slack edits were not sent in time")


class InjectServices(AsyncMiddleware):
    """Puts the services in every request's context (listeners take them as `services`).

    A class, not a function middleware: Bolt builds every possible keyword argument for each
    call of a function middleware, which costs a tenth of a bare ack.
    """

    def __init__(self, services: Services) -> None:
        self.services = services

    async def async_process(
        self,
        *,
        req: AsyncBoltRequest,
        resp: BoltResponse,
        next: Callable[[], Awaitable[BoltResponse]],
    ) -> BoltResponse | None:
        req.context["services"] = self.services
        return await next()


class FailedRequestsLog(AccessLogger):
    """aiohttp's access log, for failed requests only: a JSON line for every acknowledged Slack
    request costs more CPU than Bolt's whole signature check, and Prometheus counts them."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if response.status >= 400:
            super().log(request, response, time)


class ChatOpsBolt(AsyncApp):
    """Bolt, with each request's `respond` guarded by SLACK_HOOKS_URL (`SlackHooks`) before the
    first middleware runs: Bolt's own middleware and its error handler answer through it too."""

    def __init__(self, *, hooks: SlackHooks, observer: SlackRequestObserver, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hooks = hooks
        self.observer = observer

    async def async_dispatch(self, req: AsyncBoltRequest) -> BoltResponse:
        record = self.observer.start(req)
        req.context["respond"] = self.hooks.respond_for(req.context)
        response = await super().async_dispatch(req)
        record.answered(req)
        return response


def create_bolt_app(
    settings: Settings, services: Services, metrics: Metrics | None = None
) -> AsyncApp:
    """The Bolt app with every listener registered and the services in each request's context.

    Each request gets a correlation id for its logs, and is counted and timed in `metrics`.
    """
    bolt = ChatOpsBolt(
        hooks=services.hooks,
        observer=SlackRequestObserver(metrics if metrics is not None else Metrics()),
        client=services.outbox.client,
        signing_secret=settings.slack_signing_secret.get_secret_value(),
        process_before_response=False,
        # Over HTTP the route checked the signature on the raw bytes, and `OnlyVerified` holds
        # off anything else before Bolt calls Slack; Socket Mode keeps Bolt's check as it was.
        request_verification_enabled=settings.socket_mode,
        before_authorize=OnlyVerified(),
        logger=logging.getLogger("slack_bolt"),
        # Its listener logger, under slack_bolt so that app.ops.logs keeps request bodies out of it.
        name="slack_bolt.app",
    )
    bolt.use(InjectServices(services))
    bolt.use(DropReplayedClicks(services.store))
    bolt.error(report_bolt_error)
    handlers.register(bolt)
    return bolt


@contextlib.asynccontextmanager
async def background(services: Services, tuning: Tuning = DEFAULT) -> AsyncIterator[None]:
    """Run the notifier and the poller until the block ends."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(services.notifier.run(stop), name="notifier"),
        asyncio.create_task(services.poller.run(stop), name="poller"),
        asyncio.create_task(
            expire_approvals(services, stop, tuning.deploys.approval_sweep_interval),
            name="approvals",
        ),
        asyncio.create_task(run_digest_schedules(services, stop), name="digests"),
        *clock_sweeps(services, stop, tuning),
    ]
    if services.dms is not None:
        sweep = services.dms.run(stop, tuning.inbox.dm_sweep_interval)
        tasks.append(asyncio.create_task(sweep, name="dm-summaries"))
    try:
        yield
    finally:
        stop.set()
        await services.notifier.finish_writing(services.stopping.left())
        _, still_running = await asyncio.wait(tasks, timeout=services.stopping.left())
        for task in still_running:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def clock_sweeps(
    services: Services, stop: asyncio.Event, tuning: Tuning
) -> list[asyncio.Task[None]]:
    """The loops that watch the clock: freeze start and end announcements, lock hygiene, the
    follow-up of superseded builds whose marker died, and the end of the ledger's running
    deployments no tracker follows."""
    inbox = services.inbox
    announcer = FreezeAnnouncer(
        services.policy,
        services.store,
        services.outbox,
        tuning.sweeps,
        tuning.clock,
        homes_changed=inbox.everyone_changed if inbox is not None else None,
    )
    hygiene = LockHygiene(
        services.policy,
        services.store,
        services.outbox,
        tuning.clock,
        late=tuning.sweeps.announce_late,
        lease=tuning.sweeps.lock_expiry_lease,
    )
    stale_blocks = StaleBlocks(
        services.policy,
        services.store,
        services.buildkite,
        services.outbox,
        services.auditor,
        observe=services.tracker.observe,
        clock=tuning.clock,
        lease=tuning.sweeps.superseded_lease,
    )
    ledger_followup = LedgerFollowUp(
        services.store,
        services.buildkite,
        LedgerRecorder(services.policy, services.store, services.buildkite),
        tuning.clock,
        interval=tuning.sweeps.ledger_interval,
        give_up_after=tuning.sweeps.ledger_give_up_after,
    )
    outage = services.redis_outage
    return [
        asyncio.create_task(
            sweep_every(
                "the superseded builds' follow-up",
                stale_blocks.resume,
                tuning.sweeps.superseded_interval,
                stop,
                outage,
            ),
            name="superseded",
        ),
        asyncio.create_task(
            sweep_every(
                "the freeze announcements",
                announcer.sweep,
                tuning.sweeps.freeze_interval,
                stop,
                outage,
            ),
            name="freezes",
        ),
        asyncio.create_task(
            sweep_every(
                "the lock reminders", hygiene.sweep, tuning.sweeps.lock_interval, stop, outage
            ),
            name="lock-hygiene",
        ),
        asyncio.create_task(
            sweep_every(
                "the ledger's unfollowed deployments",
                ledger_followup.sweep,
                tuning.sweeps.ledger_interval,
                stop,
                outage,
            ),
            name="ledger-followup",
        ),
    ]


async def expire_approvals(
    services: Services,
    stop: asyncio.Event,
    interval: float = DEFAULT.deploys.approval_sweep_interval,
) -> None:
    """Close approval requests that ran out of time, so their message says so."""
    approvals = Approvals(services)
    while not stop.is_set():
        try:
            await approvals.expire_approvals()
        except (RedisError, OSError) as exc:
            # Redis is down: the readiness check says so; a line every sweep would not.
            services.redis_outage.failed(exc, "the approval expiry sweep")
        except Exception:
            log.exception("approval expiry sweep failed; retrying")
        else:
            services.redis_outage.recovered()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


@dataclass
class RunningBot:
    services: Services
    bolt: AsyncApp
    port: int
    #: The agents' /mcp endpoint (app.agents).
    mcp: McpEndpoint


@contextlib.asynccontextmanager
async def start_bot(
    settings: Settings,
    *,
    host: str = "0.0.0.0",  # noqa: S104 - the bot serves Slack and Buildkite from outside
    port: int | None = None,
    tuning: Tuning = DEFAULT,
) -> AsyncIterator[RunningBot]:
    """Start the whole bot (web routes, Slack connection, notifier, poller) for the block's life.

    `port=0` picks a free port (tests); the bound port is in the result.
    """
    metrics = Metrics()
    async with open_services(settings, metrics, tuning) as services:
        bolt = create_bolt_app(settings, services, metrics)
        readiness = Readiness(
            services.store,
            settings,
            {
                "slack": lambda: check_slack(services.outbox.client),
                "buildkite": lambda: check_buildkite(services.buildkite, thorough=False),
            },
        )
        mcp = McpEndpoint(create_gateway(services, metrics))
        web_app = create_web_app(
            services,
            None if settings.socket_mode else bolt,
            metrics=metrics,
            readiness=readiness,
            mcp=mcp.handle,
        )
        runner = StoppingRunner(
            web_app,
            services.stopping,
            handle_signals=False,
            access_log_class=FailedRequestsLog,
        )
        await runner.setup()
        socket_handler = None
        connecting: asyncio.Task[None] | None = None
        try:
            site = web.TCPSite(runner, host=host, port=settings.port if port is None else port)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else settings.port
            await readiness.check_at_start()
            async with mcp.running(services.stopping), background(services, tuning):
                if settings.socket_mode:
                    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

                    assert settings.slack_app_token is not None
                    socket_handler = AsyncSocketModeHandler(
                        bolt, settings.slack_app_token.get_secret_value()
                    )
                    # Connecting retries for as long as Slack is unreachable: it runs beside
                    # the bot, so that a signal can still stop the process meanwhile.
                    connecting = asyncio.create_task(
                        _connect_socket(socket_handler, bound), name="socket-connect"
                    )
                else:
                    log.info("listening for Slack and Buildkite on port %s", bound)
                yield RunningBot(services=services, bolt=bolt, port=bound, mcp=mcp)
                log.info("shutting down: no new requests; finishing the ones in flight")
                services.stopping.start()
                await mcp.stop_waits()  # agents' waits answer now, not after the grace
                # Stop taking work first, then let acknowledged requests finish their calls
                # before the notifier and poller stop and the clients close. Pending builds
                # stay in Redis for the next start.
                if socket_handler is not None:
                    await _close_socket(socket_handler, connecting, services.stopping)
                    socket_handler = None
                await site.stop()
                await services.finish_inflight()
        finally:
            services.stopping.start()
            if socket_handler is not None:
                await _close_socket(socket_handler, connecting, services.stopping)
            await runner.cleanup()


def shutdown_bound(tuning: Tuning = DEFAULT) -> float:
    """The longest `start_bot`'s shutdown can take after SIGTERM: every step shares one budget
    (`Tuning.shutdown_grace`, see app.ops.shutdown), plus the moment a request cancelled at its
    end gets to tell its user, plus the floor each later step still gets once it is spent. A
    supervisor's grace before SIGKILL (a Kubernetes `terminationGracePeriodSeconds`) must be
    longer."""
    steps_after_budget = 7  # socket (2), in flight, notifier writes, loops, aiohttp, outbox
    return (
        tuning.shutdown_grace
        + tuning.deploys.answer_on_cancel_timeout
        + steps_after_budget * shutdown_floor
    )


class StoppingRunner(web.AppRunner):
    """aiohttp's runner, whose wait for its handlers at cleanup is what is left of the stop's
    budget rather than a fixed timeout of its own."""

    def __init__(self, app: web.Application, stopping: StopBudget, **kwargs: Any) -> None:
        super().__init__(app, shutdown_timeout=stopping.seconds, **kwargs)
        self._stopping = stopping

    async def cleanup(self) -> None:
        # aiohttp reads this when it waits for the handlers; it has no public setter.
        self._shutdown_timeout = self._stopping.left()
        await super().cleanup()


async def _connect_socket(handler: AsyncSocketModeHandler, port: int) -> None:
    await handler.connect_async()  # type: ignore[no-untyped-call]
    if not handler.client.closed:
        log.info("connected to Slack in Socket Mode; webhook on port %s", port)


async def _close_socket(
    handler: AsyncSocketModeHandler, connecting: asyncio.Task[None] | None, stopping: StopBudget
) -> None:
    """Disconnect first, so that Slack sends events to the other replicas; a connect still
    retrying (Slack unreachable) is stopped rather than waited for."""
    if connecting is not None and not connecting.done():
        connecting.cancel()
        await asyncio.wait([connecting], timeout=stopping.left())
    try:
        await asyncio.wait_for(handler.close_async(), timeout=stopping.left())  # type: ignore[no-untyped-call]
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        log.warning("shutdown: the Socket Mode connection did not close cleanly: %s", e)


async def serve(settings: Settings, stop: asyncio.Event, tuning: Tuning = DEFAULT) -> None:
    """Run the bot until `stop` is set."""
    async with start_bot(settings, tuning=tuning):
        freeze_heap()
        await stop.wait()


def freeze_heap() -> None:
    """Move what start-up built (modules, clients, the Bolt app) out of the garbage collector's
    reach: it lives as long as the process, and scanning it again on every collection was about
    a twentieth of the bot's CPU per request. Only for a process that runs one bot: in a test
    process it would keep every earlier test's garbage too."""
    gc.collect()
    gc.freeze()


def run(settings: Settings, tuning: Tuning = DEFAULT) -> None:
    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop, tuning)

    asyncio.run(_main())


async def serve_mcp_stdio(settings: Settings, agent: Agent, tuning: Tuning = DEFAULT) -> None:
    """`python -m app mcp`: the bot's services, serving one agent over stdio.

    With a shared Redis the running bot's notifier posts and follows the builds this process
    starts; with the embedded store nobody else could, so this process runs them itself.
    """
    from app.agents.stdio import serve_stdio  # the SDK, only for this mode

    async with open_services(settings, tuning=tuning) as services:
        gateway = create_gateway(services)
        async with contextlib.AsyncExitStack() as stack:
            if settings.redis_url is None:
                log.warning("mcp over stdio with the embedded store: following its own builds")
                await stack.enter_async_context(background(services, tuning))
            try:
                await serve_stdio(gateway, agent)
            finally:
                await gateway.changes.close()
                services.stopping.start()
                await services.finish_inflight()


def run_mcp_stdio(settings: Settings, agent: Agent, tuning: Tuning = DEFAULT) -> None:
    asyncio.run(serve_mcp_stdio(settings, agent, tuning))
