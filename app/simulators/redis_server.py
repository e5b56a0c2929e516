"""A throwaway redis-server on a free port, for the tests and the benchmarks.

Part of the sandbox's and the tests' simulators of Slack and Buildkite: the real Redis they run
beside them (the sandbox itself uses the embedded store, or --redis-url).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import redis as sync_redis


class RedisServerMissing(RuntimeError):
    """redis-server is not installed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free port, which tests may stop and start again.

    `persistent` keeps an append-only file in `dir`, as a real deployment does, so that its
    data survives a stop and start; otherwise nothing is kept on disk.
    """

    def __init__(self, *, persistent: bool = False) -> None:
        self.persistent = persistent
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bkchatops-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing(
                "redis-server is not installed: install it (apt-get install redis-server) "
                "or set REDIS_URL to a Redis that may be flushed",
            )
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "everysec",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = sync_redis.Redis(port=self.port)
        deadline = time.monotonic() + 30  # a loaded machine is slow to start it
        while True:
            try:
                client.ping()
                break
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def redis_url_or_throwaway() -> Iterator[str]:
    """REDIS_URL when set (a Redis that may be flushed), else a throwaway redis-server's URL,
    stopped and removed afterwards. Raises `RedisServerMissing` when it cannot start one."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
