"""The shared clients a request needs, who asked (`Actor`), and a request's stable id."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import redis.asyncio as redis

from app.core.audit import Auditor
from app.core.deploy_queue import DeployQueue
from app.core.policy import Policy
from app.core.routing import Router
from app.ops.outages import RedisOutage
from app.ops.shutdown import StopBudget
from app.settings import Settings
from app.slack.directory import Directory
from app.slack.outbox import Outbox
from app.slack.response_urls import SlackHooks
from app.storage.store import Store
from app.tracking.intake import Intake
from app.tracking.notifier import Notifier
from app.tracking.poller import Poller
from app.tuning import DEFAULT, Tuning
from buildkite.client import BuildkiteClient

if TYPE_CHECKING:
    from app.core.inbox import DirectMessages, Inbox

log = logging.getLogger(__name__)


@dataclass
class Services:
    """The shared clients and services, created once per process and passed down via context."""

    settings: Settings
    http: httpx.AsyncClient
    redis: redis.Redis
    buildkite: BuildkiteClient
    store: Store
    outbox: Outbox
    tracker: Intake
    notifier: Notifier
    poller: Poller
    policy: Policy
    directory: Directory
    auditor: Auditor
    router: Router
    #: The only way to a response_url outside Bolt's `respond` (see app.slack.response_urls).
    hooks: SlackHooks
    #: Listener tasks still working after their ack, awaited at shutdown.
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Slash-command deploys: how many run at once, and how many may wait for their turn.
    deploys: DeployQueue = field(default_factory=DeployQueue)
    #: Waits and sizes; `main` may pass its own (see app.tuning).
    tuning: Tuning = DEFAULT
    #: The loops' shared account of a Redis outage, so that it is logged once.
    redis_outage: RedisOutage = field(default_factory=RedisOutage)
    #: The stop's one time budget (Tuning.shutdown_grace), shared by every step of a shutdown.
    stopping: StopBudget = field(default_factory=lambda: StopBudget(DEFAULT.shutdown_grace))
    #: Whose builds are whose, and each person's App Home (see app.core.inbox).
    inbox: Inbox | None = None
    #: DMs about a person's own finished builds, with their preferences.
    dms: DirectMessages | None = None

    async def finish_inflight(self) -> None:
        """Wait (within the stop's budget) for acknowledged requests to finish what they
        started; deploys still waiting for their turn are told at once that they were not."""
        self.deploys.close()
        current = asyncio.current_task()
        tasks = [t for t in self.inflight if t is not current and not t.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.stopping.left())
            for task in late:
                log.warning("shutdown: a request was still running when the stop's time ran out")
                task.cancel()
            if late:
                # Long enough for a canceled request to tell its user, before the clients close.
                await asyncio.wait(late, timeout=self.tuning.deploys.answer_on_cancel_timeout)


def request_id_for(*parts: str) -> str:
    """A short, stable id for a request, derived from what Slack sent."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
