"""What every benchmark shares: a throwaway Redis, child processes, percentiles, the machine."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from app.simulators.redis_server import RedisServerMissing, redis_url_or_throwaway

#: Secrets of the benchmark's fakes: obviously fake, never real-looking.
SIGNING_SECRET = "bench-signing-secret"  # noqa: S105 - the fakes' own
WEBHOOK_TOKEN = "bench-webhook-token"  # noqa: S105
BUILDKITE_TOKEN = "bk-bench-token"  # noqa: S105
SLACK_TOKEN = "xoxb-test"  # noqa: S105
USER = "U0USER"

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank: the value at rank ceil(p/100 * n) (as the digest, docs/commands.md)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def machine() -> dict[str, Any]:
    """Where the figures come from: cores, CPU model, Python, OS."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def unexpected(*fakes: Any) -> list[str]:
    """What the fakes did not expect, except stray probes of other paths (on a shared machine a
    freed port can still be polled by someone else's process)."""
    return [u for fake in fakes for u in fake.unexpected if "unknown path" not in u]


def code_fingerprint() -> dict[str, str]:
    """Which code was measured: the commit, and a digest of the packages' files as they are."""
    digest = hashlib.sha256()
    for package in ("app", "handlers", "buildkite"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from the PATH
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return {"commit": commit, "packages_sha256": digest.hexdigest()[:16]}


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """REDIS_URL when set (a Redis the benchmark may flush), else a throwaway redis-server."""
    try:
        with redis_url_or_throwaway() as url:
            yield url
    except RedisServerMissing as exc:
        raise SystemExit(str(exc)) from None


class Child:
    """A server of the benchmark in its own process (`python -m bench.serve ...`).

    It prints one JSON line when it is ready, and stops when its stdin closes; its stderr (the
    bot's logs) goes to a file, shown if it fails.
    """

    def __init__(self, role: str, config: dict[str, Any]) -> None:
        self.role = role
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self.log = Path(tempfile.mkstemp(prefix=f"bench-{role}-", suffix=".log")[1])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        with self.log.open("wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.serve",
                self.role,
                json.dumps(self.config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=tempfile.gettempdir(),  # no developer's .env or policy.yml is read
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if not line:
            await self.kill()
            raise RuntimeError(f"{self.role} did not start:\n{self.tail()}")
        self.info = json.loads(line)
        return self.info

    async def stop(self, grace: float = 5.0) -> dict[str, Any]:
        """Close its stdin; returns the summary line it prints on the way out, if any."""
        if self.process is None:
            return {}
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        summary: dict[str, Any] = {}
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), grace)
            if line.strip():
                summary = json.loads(line)
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            await self.kill()
        self.process = None
        return summary

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def error_lines(self) -> int:
        """Log lines at ERROR or above (the bot logs JSON lines)."""
        count = 0
        with contextlib.suppress(OSError):
            for line in self.log.read_text(errors="replace").splitlines():
                if '"level": "error"' in line or '"level": "critical"' in line:
                    count += 1
        return count


@contextlib.asynccontextmanager
async def child(role: str, config: dict[str, Any]) -> AsyncIterator[Child]:
    process = Child(role, config)
    await process.start()
    try:
        yield process
    except BaseException:
        print(f"{role} log, last lines:\n{process.tail()}", file=sys.stderr)
        raise
    finally:
        await process.stop()
        process.log.unlink(missing_ok=True)
