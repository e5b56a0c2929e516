"""The release ledger: each pipeline's deployments (builds the bot started, or announced by a
`deploy: true` route), bounded to the last LEDGER_MAX per pipeline and LEDGER_KEEP of time.

One compact JSON string per deployment, a sorted set of build numbers per pipeline, and one
sorted set (and hash) of the pipelines in the ledger, so that `/deploy status all` reads Redis
only. Writes go through one script, so that the same build reported twice changes nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from enum import StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.storage import lua
from app.storage.codec import text
from app.storage.keys import (
    DEPLOYMENT_KEY,
    DEPLOYMENT_PREFIX,
    LEDGER_FOLLOWUP_KEY,
    LEDGER_INFO_KEY,
    LEDGER_KEEP,
    LEDGER_KEY,
    LEDGER_MAX,
    LEDGER_PIPELINES_KEY,
)

#: A build's web URL is usually `{_WEB}{org}/{pipeline}/builds/{number}`: only the org is kept.
_WEB = "https://buildkite.com/"
_ORG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class Outcome(StrEnum):
    """How a deployment ended (a build's final state), or that it has not yet."""

    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    NOT_RUN = "not_run"


class Source(StrEnum):
    """Why a build is a deployment."""

    #: The bot started it (its meta_data says so).
    BOT = "bot"
    #: A notification route marked `deploy: true` announced it.
    ROUTE = "route"


class Deployment(BaseModel):
    """One deployment in the ledger. Stored with one-letter names (see test_ledger_footprint)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    pipeline: str = Field(alias="p")
    number: int = Field(alias="n")
    web_url: str = Field(alias="u")
    commit: str = Field(alias="c")
    branch: str = Field(alias="b")
    outcome: Outcome = Field(alias="o")
    source: Source = Field(default=Source.BOT, alias="s")
    #: The Slack user who asked for it (None: announced, or started outside Slack).
    requested_by: str | None = Field(default=None, alias="r")
    #: `requested_by` is only what the build's meta_data says (which any of its jobs can set):
    #: the bot has no record of its own of who asked (a deploy route's build, a rebuilt ledger).
    requester_unverified: bool = Field(default=False, alias="rm")
    approved_by: str | None = Field(default=None, alias="a")
    #: `approved_by` is only what the build's meta_data says: the bot read it from the build
    #: after its start (its own create's answer is the only copy no job could have rewritten).
    approver_unverified: bool = Field(default=False, alias="am")
    #: Unix seconds.
    started_at: int | None = Field(default=None, alias="t")
    finished_at: int | None = Field(default=None, alias="f")
    #: The live build this one rolled back, when it is a rollback.
    rollback_of: int | None = Field(default=None, alias="rb")
    #: `pipeline#number` of the deployment whose commit this one promoted.
    promoted_from: str | None = Field(default=None, alias="pf")

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED

    @property
    def duration(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(self.finished_at - self.started_at, 0)

    def encode(self) -> str:
        """Its JSON, without what its key says already (the pipeline), without defaults, and
        its web URL as its organization alone when it has Buildkite's usual form."""
        data = self.model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude={"pipeline", "source"}
        )
        org = self.web_url.removeprefix(_WEB).removesuffix(f"/{self.pipeline}/builds/{self.number}")
        if self.web_url.startswith(_WEB) and _ORG.match(org):
            data["u"] = org
        if self.source is not Source.BOT:
            data["s"] = self.source.value
        if not self.requester_unverified or self.requested_by is None:
            data.pop("rm", None)
        if not self.approver_unverified or self.approved_by is None:
            data.pop("am", None)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


class PipelineInfo(BaseModel):
    """What the ledger knows of a pipeline from its builds, for status without asking Buildkite."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    repository: str | None = None
    default_branch: str | None = None


class ReleaseLedger:
    """Record deployments (idempotently) and read them back, newest first."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._record = client.register_script(lua.source("ledger_record"))
        self._take_followup = client.register_script(lua.source("take_due"))

    async def record_deployment(
        self, deployment: Deployment, *, info: PipelineInfo | None = None, now: float | None = None
    ) -> bool:
        """Write a deployment; False when the ledger already had it as final as this (or it is
        older than LEDGER_KEEP). A running report never replaces a final one."""
        now = time.time() if now is None else now
        started = int(now) if deployment.started_at is None else deployment.started_at
        expire_at = started + LEDGER_KEEP
        if expire_at <= now:
            return False
        pipeline = deployment.pipeline
        written = await self._record(
            keys=[
                DEPLOYMENT_KEY.format(pipeline=pipeline, number=deployment.number),
                LEDGER_KEY.format(pipeline=pipeline),
                LEDGER_PIPELINES_KEY,
                LEDGER_INFO_KEY,
            ],
            args=[
                deployment.encode(),
                deployment.number,
                0 if deployment.outcome is Outcome.RUNNING else (deployment.finished_at or 1),
                expire_at,
                LEDGER_MAX,
                pipeline,
                started,
                DEPLOYMENT_PREFIX.format(pipeline=pipeline),
                info.model_dump_json(exclude_none=True) if info else "",
                LEDGER_KEEP,
                int(now) - LEDGER_KEEP,
            ],
        )
        return bool(written)

    async def deployment(self, pipeline: str, number: int) -> Deployment | None:
        raw = await self.redis.get(DEPLOYMENT_KEY.format(pipeline=pipeline, number=number))
        return _decode(raw, pipeline) if raw else None

    async def deployments(
        self, pipeline: str, *, limit: int = LEDGER_MAX, prune: bool = True
    ) -> list[Deployment]:
        """The pipeline's deployments, newest (highest build number) first."""
        return (await self.deployments_of([pipeline], limit=limit, prune=prune))[pipeline]

    async def deployments_of(
        self, pipelines: Sequence[str], *, limit: int = LEDGER_MAX, prune: bool = True
    ) -> dict[str, list[Deployment]]:
        """Several pipelines' deployments, newest first, in two round trips whatever their count.
        With `prune`, the index forgets the entries that expired; without, nothing is written
        (a dry run's read)."""
        if not pipelines:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for pipeline in pipelines:
                pipe.zrevrange(LEDGER_KEY.format(pipeline=pipeline), 0, max(limit, 1) - 1)
            numbers: list[list[bytes]] = await pipe.execute()
        keys = [
            DEPLOYMENT_KEY.format(pipeline=pipeline, number=text(number))
            for pipeline, listed in zip(pipelines, numbers, strict=True)
            for number in listed
        ]
        values = await self.redis.mget(keys) if keys else []
        found: dict[str, list[Deployment]] = {pipeline: [] for pipeline in pipelines}
        gone: dict[str, list[str]] = {}
        index = 0
        for pipeline, listed in zip(pipelines, numbers, strict=True):
            for number in listed:
                raw = values[index]
                index += 1
                entry = _decode(raw, pipeline) if raw else None
                if entry is None:
                    gone.setdefault(pipeline, []).append(text(number))
                else:
                    found[pipeline].append(entry)
        for pipeline, expired in gone.items() if prune else ():
            # Their entries expired: forget them in the index too.
            await self.redis.zrem(LEDGER_KEY.format(pipeline=pipeline), *expired)
        return found

    async def follow_up_deployment(self, pipeline: str, number: int, *, at: float) -> None:
        """Ask how this running deployment, which no tracker follows, ended, from `at` on (and
        then every so often, see `follow_up_later`) until `deployment_followed_up`."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(LEDGER_FOLLOWUP_KEY, {f"{pipeline}#{number}": at}, nx=True)
            pipe.expire(LEDGER_FOLLOWUP_KEY, LEDGER_KEEP)
            await pipe.execute()

    async def take_deployment_followups(
        self, now: float, *, lease_until: float, limit: int = 50
    ) -> list[tuple[str, int]]:
        """The (pipeline, number) of the deployments due to be asked about, each handed to one
        caller only and leased to it until `lease_until` (one that dies leaves it to another)."""
        due = await self.redis.zrangebyscore(LEDGER_FOLLOWUP_KEY, "-inf", now, start=0, num=limit)
        taken = []
        for member in [text(m) for m in due]:
            score = await self._take_followup(
                keys=[LEDGER_FOLLOWUP_KEY], args=[member, now, lease_until]
            )
            pipeline, _, number = member.rpartition("#")
            if score is not None and pipeline and number.isdigit():
                taken.append((pipeline, int(number)))
            elif score is not None:
                await self.redis.zrem(LEDGER_FOLLOWUP_KEY, member)  # not one this release wrote
        return taken

    async def follow_up_later(self, pipeline: str, number: int, *, at: float) -> None:
        """The deployment is still running: ask again from `at` on."""
        await self.redis.zadd(LEDGER_FOLLOWUP_KEY, {f"{pipeline}#{number}": at}, xx=True)

    async def deployment_followed_up(self, pipeline: str, number: int) -> None:
        """The deployment's end is recorded (or never will be here): no more asking."""
        await self.redis.zrem(LEDGER_FOLLOWUP_KEY, f"{pipeline}#{number}")

    async def ledger_pipelines(self, *, now: float | None = None) -> list[str]:
        """The pipelines with a deployment in the last LEDGER_KEEP, in name order."""
        now = time.time() if now is None else now
        names = await self.redis.zrangebyscore(LEDGER_PIPELINES_KEY, now - LEDGER_KEEP, "+inf")
        return sorted(text(name) for name in names)

    async def pipeline_infos(self, pipelines: Sequence[str]) -> dict[str, PipelineInfo]:
        if not pipelines:
            return {}
        values = await self.redis.hmget(LEDGER_INFO_KEY, list(pipelines))
        infos = {}
        for pipeline, raw in zip(pipelines, values, strict=True):
            if raw:
                try:
                    infos[pipeline] = PipelineInfo.model_validate_json(raw)
                except ValidationError:
                    continue
        return infos


def _decode(raw: bytes | str, pipeline: str) -> Deployment | None:
    try:
        data = json.loads(raw)
        url = str(data.get("u", ""))
        if _ORG.match(url):
            data["u"] = f"{_WEB}{url}/{pipeline}/builds/{data.get('n')}"
        return Deployment.model_validate({**data, "p": pipeline})
    except (ValueError, ValidationError):
        return None  # written by a version that no longer reads the same: not a deployment
