"""The Redis client behind the store: the server at REDIS_URL, or an embedded one in memory.

Without REDIS_URL the store runs on fakeredis (with Lua, for the store's scripts) inside the
process: the same `Store`, the same scripts and streams, but nothing survives a restart and no
second process can share it.

Every client here has `driver_info=NO_CLIENT_INFO`: no `CLIENT SETINFO` on connect.
redis-py pipelines LIB-NAME and LIB-VER with health checks on; when its loop stalls past the
check interval between the two sends (a loaded machine), the check's PING reads the first
SETINFO's reply and the new connection fails as an outage ("unknown subcommand 'SETINFO'"
before Redis 7.2, "Bad response from PING" after).
"""

from __future__ import annotations

import logging
from typing import cast

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, NodesManager
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from app.ops.metrics import HEALTH_CHECK_INTERVAL, CountingRetry, Metrics
from app.settings import Settings
from app.storage.redis_url import RedisTarget, mask_url, parse_redis_url

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
    # Settings checked the URL already; this reads it the same way.
    target = parse_redis_url(settings.redis_url)
    if target.kind == "sentinel":
        return _sentinel_master(target, metrics)
    if target.kind == "cluster":
        cluster = redis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
            username=target.username,
            password=target.password,
            socket_timeout=5,
            socket_connect_timeout=5,
            driver_info=NO_CLIENT_INFO,
        )
        _unreachable_is_a_connection_error(cluster)
        return cast(redis.Redis, cluster)
    # A burst (say, 100 webhooks at once beside the notifier's writes) waits for a free
    # connection rather than failing with redis-py's "Too many connections".
    pool = redis.BlockingConnectionPool.from_url(
        target.url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=CountingRetry(metrics),
        driver_info=NO_CLIENT_INFO,
    )
    return redis.Redis.from_pool(pool)


class _NodesManager(NodesManager):
    """redis-py's node discovery, with "no node answers" raised as a RedisError.

    redis-py's cluster client raises RedisClusterException, which is not a RedisError, when it
    cannot (re)discover the cluster's nodes, and every command, pipeline and transaction goes
    through that discovery. Without this, every `except RedisError` in the bot would miss an
    unreachable cluster: a webhook would be answered 500 instead of 503, a loop would log a
    traceback instead of waiting for Redis.
    """

    __slots__ = ()

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> None:
        try:
            await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            raise RedisConnectionError(f"Redis Cluster unavailable: {exc}") from exc


def _unreachable_is_a_connection_error(cluster: redis.RedisCluster) -> None:
    """Give `cluster` the discovery above (NodesManager has slots: no attribute to patch)."""
    # The one swap of a redis-py class: RedisCluster builds its NodesManager in __init__ and
    # takes no factory or class for it (redis-py 8.1), and the subclass adds no state.
    cluster.nodes_manager.__class__ = _NodesManager


#: Connections to Redis per process, and how long a command waits for one when all are busy.
MAX_CONNECTIONS = 64
POOL_WAIT = 10.0

#: No LIB-NAME, no LIB-VER: see the module's doc.
NO_CLIENT_INFO = DriverInfo(name=None, lib_version=None)


class _SentinelMaster(redis.Redis):
    """The master's client, which also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", []):
            await sentinel.aclose()


def _sentinel_master(target: RedisTarget, metrics: Metrics) -> redis.Redis:
    """A client for the current master of a Sentinel-managed Redis (it follows failovers)."""
    assert target.service is not None
    sentinel_kwargs: dict[str, object] = {
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "driver_info": NO_CLIENT_INFO,
        # Asked once each: the next sentinel is the retry. redis-py's default (three retries with
        # a backoff of up to ten seconds) made every command wait ~16 s with two sentinels down.
        "retry": Retry(NoBackoff(), 0),
    }
    if target.sentinel_password is not None:
        # Sentinels with a `requirepass` of their own (?sentinel_password=).
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.hosts),
        sentinel_kwargs=sentinel_kwargs,
        socket_timeout=5,
        socket_connect_timeout=5,
    )
    master: redis.Redis = sentinel.master_for(
        target.service,
        redis_class=_SentinelMaster,
        db=target.db,
        username=target.username,
        password=target.password,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=HEALTH_CHECK_INTERVAL,
        retry=CountingRetry(metrics),
        driver_info=NO_CLIENT_INFO,
    )
    return master
