"""The Redis client behind the store: the server at REDIS_URL, or an embedded one in memory.

Without REDIS_URL the store runs on fakeredis (with Lua, for the store's scripts) inside the
process: the same `Store`, the same scripts and streams, but nothing survives a restart and no
second process can share it.
"""

from __future__ import annotations

import logging

import redis.asyncio as redis

from app.logs import mask_url
from app.metrics import CountingRetry, Metrics
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
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=CountingRetry(metrics),
    )
