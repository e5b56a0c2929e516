"""REDIS_URL forms beyond a single server: Sentinel and Cluster, against real redis-servers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from app.ops.metrics import Metrics
from app.settings import Settings
from app.simulators.redis_server import RedisServer, free_port
from app.storage.connection import MAX_CONNECTIONS, connect_redis
from app.storage.records import MessageTarget, Observation
from app.storage.redis_url import parse_redis_url
from app.storage.store import Store

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def settings(url: str) -> Settings:
    return Settings(
        slack_bot_token="xoxb-test",
        slack_signing_secret="secret",
        buildkite_api_token="bk-test-token",
        buildkite_org="acme",
        redis_url=url,
        _env_file=None,
    )


def _start(args: list[str], port: int, tmp: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", *args], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with sync_redis.Redis(port=port) as probe:
                probe.ping()
            return process
        except sync_redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait(timeout=10)


async def exercise(store: Store) -> None:
    """The store's multi-key scripts and transactions, which need every key in one slot."""
    assert await store.claim_request("r1", "U1") is None
    assert await store.claim_request("r1", "U2") == "U1"
    target = MessageTarget(channel="C1", requester="U1")
    assert await store.track(
        "b1",
        pipeline="web",
        number=1,
        target=target,
        phase="scheduled",
        rank=1,
        snapshot={"id": "b1"},
        final=False,
    )
    await store.ensure_group()
    (transition,) = await store.read_transitions("c1", block_ms=10)
    assert transition.new == "scheduled"
    await store.ack_transition(transition.entry_id)
    assert await store.observe(
        "b1", phase="passed", rank=6, snapshot={"id": "b1"}, final=True, blocked=False
    ) == Observation.changed("scheduled")
    assert await store.pending() == []
    assert await store.lock_pipeline("web", user="U1", reason="", ttl=60, now=time.time()) is None


def test_sentinel_urls_are_parsed() -> None:
    target = parse_redis_url("redis+sentinel://:p%40ss@a:26379,b:26380/mymaster/2")
    assert (target.kind, target.hosts, target.service, target.db, target.password) == (
        "sentinel",
        (("a", 26379), ("b", 26380)),
        "mymaster",
        2,
        "p@ss",
    )
    target = parse_redis_url("redis+sentinel://sentinel/mymaster?sentinel_password=s%2Fpw")
    assert (target.hosts, target.service, target.db, target.password) == (
        (("sentinel", 26379),),
        "mymaster",
        0,
        None,
    )
    assert target.sentinel_password == "s/pw"
    with pytest.raises(ValueError, match="service-name"):
        parse_redis_url("redis+sentinel://a:26379")


async def test_sentinel(tmp_path: Path, processes: list[Any]) -> None:
    master, sentinel = free_port(), free_port()
    processes.append(_start(["--port", str(master), "--save", ""], master, tmp_path))
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel}\nsentinel monitor main 127.0.0.1 {master} 1\n")
    processes.append(_start([str(conf), "--sentinel"], sentinel, tmp_path))
    client = connect_redis(settings(f"redis+sentinel://127.0.0.1:{sentinel}/main/0"), Metrics())
    try:
        await exercise(Store(client))
    finally:
        await client.aclose()
    with sync_redis.Redis(port=master) as direct:
        assert direct.exists("{bkchatops}:build:b1")


def _cluster_state(node: sync_redis.Redis) -> str:
    info = node.cluster("INFO")
    if isinstance(info, dict):
        return str(info.get("cluster_state"))
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "ok" if "cluster_state:ok" in text else "fail"


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a valid port too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            return port


async def test_cluster(tmp_path: Path, processes: list[Any]) -> None:
    port = _cluster_port()
    processes.append(
        _start(
            [
                "--port",
                str(port),
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--cluster-config-file",
                str(tmp_path / "nodes.conf"),
            ],
            port,
            tmp_path,
        )
    )
    node = sync_redis.Redis(port=port)
    node.cluster("ADDSLOTSRANGE", 0, 16383)
    deadline = time.monotonic() + 10
    while _cluster_state(node) != "ok":
        assert time.monotonic() < deadline, "the one-node cluster did not come up"
        await asyncio.sleep(0.05)
    node.close()
    # Several start-up nodes: one that is down is passed over.
    url = f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{port}"
    client = connect_redis(settings(url), Metrics())
    try:
        await exercise(Store(client))
    finally:
        await client.aclose()


def _errors(metrics: Metrics) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "bkchatops_redis_errors"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


async def test_the_first_command_after_a_redis_restart_succeeds() -> None:
    """Every pooled connection dies with the server; the next command is sent once more on a
    new connection instead of failing while Redis is back (a webhook would have got a 503)."""
    server = RedisServer()
    server.start()
    metrics = Metrics()
    client = connect_redis(settings(server.url), metrics)
    try:
        await client.set("k", "before")
        server.stop()
        server.start()  # same port; the client's pooled connection is now dead
        await asyncio.sleep(1.2)  # a restart takes longer than the health-check interval
        assert await client.set("k", "after") is True
        assert await client.get("k") == b"after"
        assert _errors(metrics) == 0

        server.stop()  # down for good: the command fails after one retry, and is counted once
        with pytest.raises(sync_redis.ConnectionError):
            await client.get("k")
        assert _errors(metrics) == 1
    finally:
        await client.aclose()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_a_burst_beyond_the_pool_waits_for_a_connection(redis_url: str) -> None:
    """More commands at once than the pool has connections: they wait their turn instead of
    failing with redis-py's "Too many connections" (seen as 503s on webhooks under load)."""
    metrics = Metrics()
    client = connect_redis(settings(redis_url), metrics)
    try:
        # Each BLPOP holds its connection for 0.2 s; 3x the pool's size run at once.
        count = 3 * MAX_CONNECTIONS
        answers = await asyncio.gather(
            *(client.blpop([f"empty-{i}"], timeout=0.2) for i in range(count))
        )
        assert answers == [None] * count
        assert _errors(metrics) == 0
    finally:
        await client.aclose()


async def test_a_command_whose_answer_is_lost_is_not_sent_again() -> None:
    """Redis ran the command, then the connection dropped before its answer: sending it again
    would run it twice (a claim would then answer its own caller "already claimed")."""
    server = RedisServer()
    server.start()
    drop_next_answer = [True]
    relays: list[asyncio.Task[None]] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relays.append(asyncio.current_task())  # type: ignore[arg-type]
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while data := await src.read(65536):
                    if answers and drop_next_answer[0] and b"PONG" not in data:
                        drop_next_answer[0] = False
                        writer.close()  # the client never sees Redis's answer
                        return
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()  # one side gone: so is the other

        await asyncio.gather(
            pipe(reader, upstream_writer, answers=False),
            pipe(upstream_reader, writer, answers=True),
            return_exceptions=True,
        )
        for end in (writer, upstream_writer):
            end.close()
            with contextlib.suppress(OSError):
                await end.wait_closed()

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    metrics = Metrics()
    client = connect_redis(settings(f"redis://127.0.0.1:{port}/0"), metrics)
    try:
        drop_next_answer[0] = False
        await client.ping()  # connected (and its handshake answered) through the relay
        drop_next_answer[0] = True
        with pytest.raises(sync_redis.ConnectionError):
            await client.incr("counter")
        assert await client.get("counter") == b"1"  # ran once, not retried
        assert _errors(metrics) == 1
    finally:
        await client.aclose()
        proxy.close()
        await asyncio.wait_for(asyncio.gather(*relays, return_exceptions=True), timeout=5)
        await proxy.wait_closed()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_a_sentinel_that_does_not_answer_is_asked_once_then_the_next_one() -> None:
    """Each sentinel is asked once per look-up for the master: the next sentinel is the retry.
    The PING's connection is tried twice (the store's one retry of a connect), so each sentinel
    is asked twice. (redis-py's default retried each sentinel three times with a backoff of
    seconds: a command waited about 16 s when two sentinels were down.)"""
    accepted: list[int] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer.get_extra_info("sockname")[1])
        writer.close()

    servers = [await asyncio.start_server(hang_up, "127.0.0.1", 0) for _ in range(2)]
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    url = f"redis+sentinel://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/mymaster/0"
    client = connect_redis(settings(url), Metrics())
    try:
        with pytest.raises(sync_redis.exceptions.RedisError):
            await client.ping()
    finally:
        await client.aclose()
        for server in servers:
            server.close()
            await server.wait_closed()
    assert sorted(accepted) == sorted(ports * 2)


class RecordingRedis:
    """A stand-in Redis that answers every command `+OK` (PING `+PONG`, HELLO its map) and
    keeps what the client sent, in order."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    @staticmethod
    def reply(words: list[str]) -> bytes:
        command = words[0].upper()
        if command == "HELLO":  # RESP3's handshake: a map saying which protocol
            return b"%1\r\n$5\r\nproto\r\n:" + words[1].encode() + b"\r\n"
        return b"+PONG\r\n" if command == "PING" else b"+OK\r\n"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                assert line.startswith(b"*"), line
                words = []
                for _ in range(int(line[1:])):
                    size = int((await reader.readline())[1:])
                    words.append((await reader.readexactly(size + 2))[:-2].decode())
                self.commands.append(words)
                writer.write(self.reply(words))
                await writer.drain()
        finally:
            writer.close()


async def test_a_new_connection_sends_no_client_setinfo() -> None:
    """redis-py pipelines `CLIENT SETINFO` twice on connect, with health checks on: a loop stalled
    past the check interval between the two makes the check's PING read the first reply, and the
    fresh connection fails as an outage (seen under load). The bot's connections send none."""
    fake = RecordingRedis()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect_redis(settings(f"redis://:pw@127.0.0.1:{port}/3"), Metrics())
    try:
        assert await client.set("k", "v") is True
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    sent = [" ".join(words[:2]).upper() for words in fake.commands]
    assert "CLIENT SETINFO" not in sent, sent
    assert sent[0].startswith(("AUTH", "HELLO")) and "SELECT 3" in sent and sent[-1] == "SET K"
