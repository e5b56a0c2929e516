"""The Redis client behind the store: the server at REDIS_URL, or an embedded one in memory.

Without REDIS_URL the store runs on fakeredis (with Lua, for the store's scripts) inside the
process: the same `Store`, the same scripts and streams, but nothing survives a restart and no
second process can share it.
"""

from __future__ import annotations

import logging
from typing import cast
from urllib.parse import unquote

import redis.asyncio as redis
from redis.asyncio.sentinel import Sentinel

from app.logs import mask_url
from app.metrics import HEALTH_CHECK_INTERVAL, CountingRetry, Metrics
from app.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_WARNING = (
    "REDIS_URL is not set: tracking is kept in this process's memory (embedded store). Builds "
    "being followed are lost on restart, and only one bot process may run. Set REDIS_URL for "
    "production."
)


def connect_redis(settings: Settings, metrics: Metrics) -> redis.Redis:
    """A client for REDIS_URL (Redis errors counted in `metrics`), or an embedded store."""
    if settings.redis_url is None:
        import fakeredis

        log.warning(EMBEDDED_WARNING)
        # A server of its own: fakeredis would otherwise share one between clients alike.
        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    log.debug("using Redis at %s", mask_url(settings.redis_url))
    url = settings.redis_url
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel_master(url, metrics)
    if url.startswith(CLUSTER_SCHEME):
        cluster = redis.RedisCluster.from_url(
            "redis://" + url.removeprefix(CLUSTER_SCHEME),
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        return cast(redis.Redis, cluster)
    # A burst (say, 100 webhooks at once beside the notifier's writes) waits for a free
    # connection rather than failing with redis-py's "Too many connections".
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=CountingRetry(metrics),
    )
    return redis.Redis.from_pool(pool)


#: Connections to Redis per process, and how long a command waits for one when all are busy.
MAX_CONNECTIONS = 64
POOL_WAIT = 10.0


SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """`redis+sentinel://[:password@]host:26379[,host:26379…]/service[/db]`, as
    (sentinels, service name, db, password). The password is the Redis servers' own."""
    rest = url.removeprefix(SENTINEL_SCHEME)
    password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        password = unquote(credentials.split(":", 1)[1] if ":" in credentials else credentials)
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise ValueError("expected redis+sentinel://host:26379[,host:26379]/service-name[/db]")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        sentinels.append((name or host, int(port) if name else 26379))
    db = int(parts[1]) if len(parts) > 1 else 0
    return sentinels, parts[0], db, password


class _SentinelMaster(redis.Redis):
    """The master's client, which also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            await sentinel.aclose()


def _sentinel_master(url: str, metrics: Metrics) -> redis.Redis:
    """A client for the current master of a Sentinel-managed Redis (it follows failovers)."""
    sentinels, service, db, password = parse_sentinel_url(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, socket_timeout=5, socket_connect_timeout=5
    )
    master: redis.Redis = sentinel.master_for(
        service,
        redis_class=_SentinelMaster,
        db=db,
        password=password,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=CountingRetry(metrics),
    )
    return master
