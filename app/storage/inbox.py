"""What the bot keeps for the surfaces that are a person's own: Events API deliveries already
handled, who opened their Home and what is in it, its publish debounce, and DM preferences."""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.storage import lua
from app.storage.codec import text
from app.storage.keys import (
    APPROVAL_EXPIRY_KEY,
    DM_DONE_KEY,
    DM_DONE_TTL,
    DM_DUE_KEY,
    DM_HELD_KEY,
    DM_HELD_TTL,
    DM_LEASE_KEY,
    DM_LEASE_TTL,
    EVENT_KEY,
    EVENT_TTL,
    HOME_BUILDS_KEPT,
    HOME_BUILDS_KEY,
    HOME_BUILDS_TTL,
    HOME_DIRTY_KEY,
    HOME_DIRTY_TTL,
    HOME_EMAIL_KEY,
    HOME_OPENED_KEY,
    HOME_OPENED_TTL,
    HOME_WATCHERS_KEY,
    HOME_WINDOW_KEY,
    PIPELINE_LOCK_KEY,
    PREFS_KEY,
    PREFS_TTL,
    UNFURLS_KEPT,
    UNFURLS_KEY,
    UNFURLS_TTL,
)
from app.storage.records import PipelineLock


class SharedUnfurl(BaseModel):
    """Where a followed build's link was unfurled, and who shared it (for the card's buttons)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str
    channel: str
    user: str
    ts: str | None = None
    unfurl_id: str | None = None
    source: str | None = None

    @property
    def field(self) -> str:
        return f"{self.channel}:{self.ts or self.unfurl_id}:{self.url}"


class DmMode(StrEnum):
    """Which finished builds of theirs a person is told of in a DM."""

    OFF = "off"
    FAILURES = "failures"
    ALL = "all"


class DmPrefs(BaseModel):
    """A person's DM preferences; quiet hours are whole hours of their own Slack timezone."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: DmMode = DmMode.FAILURES
    quiet_from: int | None = Field(default=None, ge=0, le=23)
    quiet_to: int | None = Field(default=None, ge=0, le=23)


def email_digest(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


class InboxRecords:
    """Typed access to the inbox's keys (each with its TTL)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._clear_held = client.register_script(lua.source("clear_held_dms"))

    async def first_event(self, event_id: str) -> bool:
        """Remember an Events API delivery; False if this event was handled before (a retry)."""
        key = EVENT_KEY.format(event_id=event_id)
        return bool(await self.redis.set(key, "1", nx=True, ex=EVENT_TTL))

    # -- App Home ------------------------------------------------------------------------

    async def home_opened(self, user: str, *, email: str | None, now: float) -> None:
        """The person opened their Home: republish it on changes for 7 days, and know their
        email (for their builds by Buildkite author) as long."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(HOME_OPENED_KEY.format(user=user), repr(now), ex=HOME_OPENED_TTL)
            pipe.zadd(HOME_WATCHERS_KEY, {user: now})
            pipe.zremrangebyscore(HOME_WATCHERS_KEY, "-inf", f"({now - HOME_OPENED_TTL}")
            pipe.expire(HOME_WATCHERS_KEY, HOME_OPENED_TTL)
            if email:
                key = HOME_EMAIL_KEY.format(digest=email_digest(email))
                pipe.set(key, user, ex=HOME_OPENED_TTL)
            await pipe.execute()

    async def watching_home(self, users: list[str]) -> list[str]:
        """Those of `users` who opened their Home in the last 7 days."""
        if not users:
            return []
        found = await self.redis.mget([HOME_OPENED_KEY.format(user=u) for u in users])
        return [user for user, seen in zip(users, found, strict=True) if seen is not None]

    async def home_watchers(self, now: float) -> list[str]:
        """Everyone who opened their Home in the last 7 days (as `watching_home` has them)."""
        since = now - HOME_OPENED_TTL
        found = await self.redis.zrangebyscore(HOME_WATCHERS_KEY, since, "+inf")
        return await self.watching_home([text(user) for user in found])

    async def user_with_email(self, email: str) -> str | None:
        raw = await self.redis.get(HOME_EMAIL_KEY.format(digest=email_digest(email)))
        return text(raw) if raw is not None else None

    async def remember_home_builds(self, users: list[str], build_id: str, now: float) -> None:
        """Put a build in these people's Homes (the newest change first; only the last kept)."""
        if not users:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in users:
                key = HOME_BUILDS_KEY.format(user=user)
                pipe.zadd(key, {build_id: now})
                pipe.zremrangebyrank(key, 0, -HOME_BUILDS_KEPT - 1)
                pipe.expire(key, HOME_BUILDS_TTL)
            await pipe.execute()

    async def home_build_ids(self, user: str, limit: int) -> list[str]:
        key = HOME_BUILDS_KEY.format(user=user)
        return [text(b) for b in await self.redis.zrevrange(key, 0, limit - 1)]

    async def every_pipeline_lock(self) -> list[PipelineLock]:
        """Every pipeline lock, in few round trips (large SCAN pages, one MGET): a Home is drawn
        for each of a build's people on each change."""
        keys = [
            key
            async for key in self.redis.scan_iter(
                match=PIPELINE_LOCK_KEY.format(pipeline="*"), count=1000
            )
        ]
        if not keys:
            return []
        locks = []
        for raw in await self.redis.mget(keys):
            if raw:
                try:
                    locks.append(PipelineLock.model_validate_json(raw))
                except ValidationError:
                    continue
        return sorted(locks, key=lambda lock: lock.pipeline)

    async def pending_approval_ids(self, now: float) -> list[str]:
        """Approval requests not expired yet (decided ones may be among them: read each)."""
        return [text(i) for i in await self.redis.zrangebyscore(APPROVAL_EXPIRY_KEY, now, "+inf")]

    async def mark_home_dirty(self, users: list[str]) -> None:
        if not users:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.set(HOME_DIRTY_KEY.format(user=user), "1", ex=HOME_DIRTY_TTL)
            await pipe.execute()

    async def home_dirty(self, user: str) -> bool:
        return bool(await self.redis.exists(HOME_DIRTY_KEY.format(user=user)))

    async def take_home_dirty(self, user: str) -> bool:
        """Clear the person's "changed" mark; True if it was set."""
        return bool(await self.redis.delete(HOME_DIRTY_KEY.format(user=user)))

    async def open_home_window(self, user: str, ms: int) -> bool:
        """Claim the person's next Home publish; False while the last one's window lasts."""
        key = HOME_WINDOW_KEY.format(user=user)
        return bool(await self.redis.set(key, "1", nx=True, px=max(ms, 1)))

    async def home_window_left_ms(self, user: str) -> int:
        left = int(await self.redis.pttl(HOME_WINDOW_KEY.format(user=user)))
        return max(left, 0)

    # -- live unfurls ---------------------------------------------------------------------

    async def remember_unfurl(self, build_id: str, shared: SharedUnfurl) -> None:
        key = UNFURLS_KEY.format(build_id=build_id)
        if await self.redis.hlen(key) >= UNFURLS_KEPT and not await self.redis.hexists(
            key, shared.field
        ):
            return  # enough places show it already: the newest shares keep their snapshot
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, shared.field, shared.model_dump_json())
            pipe.expire(key, UNFURLS_TTL)
            await pipe.execute()

    async def unfurls_of(self, build_id: str) -> list[SharedUnfurl]:
        found = []
        for raw in (await self.redis.hgetall(UNFURLS_KEY.format(build_id=build_id))).values():
            try:
                found.append(SharedUnfurl.model_validate_json(raw))
            except ValidationError:
                continue
        return found

    async def forget_unfurl(self, build_id: str, shared: SharedUnfurl) -> None:
        await self.redis.hdel(UNFURLS_KEY.format(build_id=build_id), shared.field)

    # -- DM preferences -------------------------------------------------------------------

    async def dm_prefs(self, user: str) -> DmPrefs:
        """The person's preferences, or the defaults (failures only, no quiet hours)."""
        raw = await self.redis.get(PREFS_KEY.format(user=user))
        if raw is None:
            return DmPrefs()
        try:
            return DmPrefs.model_validate(json.loads(text(raw)))
        except (ValueError, ValidationError):
            return DmPrefs()

    async def save_dm_prefs(self, user: str, prefs: DmPrefs) -> None:
        await self.redis.set(PREFS_KEY.format(user=user), prefs.model_dump_json(), ex=PREFS_TTL)

    # -- DMs, exactly once ----------------------------------------------------------------

    async def dm_done(self, key: str) -> bool:
        return bool(await self.redis.exists(DM_DONE_KEY.format(key=key)))

    async def mark_dm_done(self, key: str) -> None:
        await self.redis.set(DM_DONE_KEY.format(key=key), "1", ex=DM_DONE_TTL)

    async def claim_dm(self, key: str) -> bool:
        """Claim the sending of one DM for a minute; False while another process sends it."""
        return bool(
            await self.redis.set(DM_LEASE_KEY.format(key=key), "1", nx=True, ex=DM_LEASE_TTL)
        )

    async def release_dm(self, key: str) -> None:
        await self.redis.delete(DM_LEASE_KEY.format(key=key))

    async def hold_dm(self, user: str, key: str, line: str, *, until: float, now: float) -> None:
        """Keep a DM for the summary sent when the person's quiet hours end (`until`), and
        count it as delivered."""
        held = DM_HELD_KEY.format(user=user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(held, f"{int(now * 1000):015d}:{key}", line)
            pipe.expire(held, DM_HELD_TTL)
            pipe.zadd(DM_DUE_KEY, {user: until}, nx=True)
            pipe.expire(DM_DUE_KEY, DM_HELD_TTL)
            pipe.set(DM_DONE_KEY.format(key=key), "1", ex=DM_DONE_TTL)
            await pipe.execute()

    async def due_summaries(self, now: float) -> list[tuple[str, float]]:
        """(person, when their quiet hours ended) for each summary due."""
        due = await self.redis.zrangebyscore(DM_DUE_KEY, "-inf", now, withscores=True)
        return [(text(entry[0]), float(entry[1])) for entry in due]

    async def held_dms(self, user: str) -> list[tuple[str, str]]:
        """The held DMs (their field, their line), oldest first."""
        held = await self.redis.hgetall(DM_HELD_KEY.format(user=user))
        return sorted((text(k), text(line)) for k, line in held.items())

    async def clear_held_dms(self, user: str, fields: list[str]) -> int:
        """Forget the held DMs a summary carried (or dropped); those held meanwhile stay, with
        the person's due summary. Returns how many are left."""
        keys = [DM_HELD_KEY.format(user=user), DM_DUE_KEY]
        return int(await self._clear_held(keys=keys, args=[user, *fields]))
