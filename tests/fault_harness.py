"""The fault suite's tools: bot subprocesses, signed traffic to them, and a reading of what reached
the fake Slack, build by build.

`python -m tests.fault_harness` is `python -m app` (run through runpy) with the build lock, and so
the takeover of a dead process's work, scaled down by FAULT_LOCK_TTL_MS: production's 30 s lock
and 60 s reclaim would not fit a test's time budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp

from app.simulators import slack_requests
from app.simulators.bot import BUILDKITE_TOKEN, SIGNING_SECRET, WEBHOOK_TOKEN
from app.simulators.buildkite import FakeBuildkite
from app.simulators.redis_server import free_port
from app.simulators.slack import FakeSlack, RecordedCall
from app.slack.render.common import STATE_LABEL

T = TypeVar("T")
BuildKey = tuple[str, int]

ROOT = Path(__file__).resolve().parent.parent
#: The bots' build lock in this suite (production: 30 s); a dead process's work is taken over
#: after twice this, as in production. Set FAULT_LOCK_TTL_MS=30000 to measure with production's.
FAULT_LOCK_TTL_MS = int(os.environ.get("FAULT_LOCK_TTL_MS") or 4000)
#: The longest a transition may wait to be taken over: its reclaim delay and the check period.
TAKEOVER_S = 2 * FAULT_LOCK_TTL_MS / 1000 * 4 / 3
#: How long a test waits for builds to settle: a backlog of writes, and two takeovers.
SETTLE_S = 60 + 2 * TAKEOVER_S
#: A bot process's start-up (its imports alone took over 30 s with three at once at load 20).
HEALTH_TIMEOUT = 120.0
STOP_GRACE = 5.0
USER = "U0USER"

FINAL_STATES = ("passed", "failed", "canceled")
_ROOT_TEXT = re.compile(r"^(?P<pipeline>[a-z0-9-]+) #(?P<number>\d+): (?P<label>.+)$")
_BUILD_URL = re.compile(
    r"https://buildkite\.com/[a-z0-9-]+/(?P<pipeline>[a-z0-9-]+)/builds/(?P<n>\d+)"
)
_LABELS = {label: state for state, label in STATE_LABEL.items()}


# -- bot processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child, before exec: be killed if the test process dies (Linux), so none leaks."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class BotProcess:
    """One `python -m app` child, its port and its log (stdout and stderr)."""

    name: str
    port: int
    #: Its own Slack token, so that the fake Slack's records tell which bot made each call.
    slack_token: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine dies."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def made(self, call: RecordedCall) -> bool:
        """Whether this bot made a recorded Slack call."""
        return call.headers.get("Authorization") == f"Bearer {self.slack_token}"

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 20) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        state = "running" if self.alive else f"exited {self.process.returncode}"
        return f"--- {self.name} (pid {self.pid}, {state}), last {lines} log lines:\n{text}"

    def log_messages(self, level: str | None = None) -> list[str]:
        """The `message` of each JSON log line, optionally of one level only."""
        found = []
        for line in self.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                found.append(line)  # a crash before logging was set up
                continue
            if isinstance(entry, dict) and (level is None or entry.get("level") == level):
                found.append(str(entry.get("message", "")))
        return found


class Fleet:
    """Bot processes sharing one Redis, pointed at the fakes served by the test process."""

    def __init__(self, slack: FakeSlack, bk: FakeBuildkite, redis_url: str, log_dir: Path) -> None:
        self.slack = slack
        self.bk = bk
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.bots: list[BotProcess] = []
        self.http: aiohttp.ClientSession | None = None
        self.secrets = [SIGNING_SECRET, WEBHOOK_TOKEN, BUILDKITE_TOKEN]
        self._responses = 0

    def _env(
        self,
        port: int,
        slack_token: str,
        poll_interval: float,
        lock_ttl_ms: int,
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        # A clean environment: nothing of the developer's own settings reaches the bots.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "SLACK_BOT_TOKEN": slack_token,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.slack.api_url,
            "SLACK_HOOKS_URL": self.slack.hooks_url,
            "BUILDKITE_API_TOKEN": BUILDKITE_TOKEN,
            "BUILDKITE_ORG": self.bk.org,
            "BUILDKITE_API_URL": self.bk.url,
            "BUILDKITE_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
            "REDIS_URL": self.redis_url,
            "PORT": str(port),
            "POLL_INTERVAL": str(poll_interval),
            "POLICY_FILE": str(self.log_dir / "no-policy.yml"),
            "LOG_LEVEL": "INFO",
            "FAULT_LOCK_TTL_MS": str(lock_ttl_ms),
            **(extra or {}),
        }

    async def start(
        self,
        count: int,
        *,
        poll_interval: float = 1.0,
        lock_ttl_ms: int = FAULT_LOCK_TTL_MS,
        env: dict[str, str] | None = None,
    ) -> list[BotProcess]:
        """Start `count` bots and wait until each answers /healthz; a bot that lost its port
        to another program between our pick and its bind is started again on another. `env`
        adds settings to the bots' environment."""
        self.http = self.http or aiohttp.ClientSession()
        started = [
            self._spawn(f"bot{len(self.bots) + 1}", poll_interval, lock_ttl_ms, env=env)
            for _ in range(count)
        ]
        for attempt in range(1, 4):
            ready = await asyncio.gather(*(self._healthy(bot) for bot in started))
            if all(ready):
                return started
            for index, bot in enumerate(started):
                if not ready[index]:
                    self.bots.remove(bot)
                    bot.log_file.close()
                    started[index] = self._spawn(
                        bot.name, poll_interval, lock_ttl_ms, log_suffix=f"-{attempt}", env=env
                    )
        raise AssertionError(f"no free port for the bots\n{self.describe()}")

    def _spawn(
        self,
        name: str,
        poll_interval: float,
        lock_ttl_ms: int,
        *,
        log_suffix: str = "",
        env: dict[str, str] | None = None,
    ) -> BotProcess:
        port = free_port()
        slack_token = f"{self.slack.bot_token}-{name}"
        self.slack.add_bot_token(slack_token)
        if slack_token not in self.secrets:
            self.secrets.append(slack_token)
        log_path = self.log_dir / f"{name}{log_suffix}.log"
        log_file = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fault_harness"],
            cwd=self.log_dir,  # so that no developer's .env is read
            env=self._env(port, slack_token, poll_interval, lock_ttl_ms, env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # only a prctl: safe between fork and exec
        )
        bot = BotProcess(name, port, slack_token, process, log_path, log_file)
        self.bots.append(bot)
        return bot

    async def _healthy(self, bot: BotProcess) -> bool:
        """Wait for the bot to say it listens and to answer /healthz; False if its port was
        taken (it exited)."""
        http = self.http
        assert http is not None
        listening = f"listening for Slack and Buildkite on port {bot.port}"
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            if not bot.alive:
                if "address already in use" in bot.log():
                    return False
                raise AssertionError(f"{bot.name} exited at start-up\n{bot.tail(40)}")
            if listening in bot.log():  # so that the answer below is not another program's
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{bot.url}/healthz") as response:
                        if response.status == 200:
                            return True
            await asyncio.sleep(0.05)
        raise AssertionError(f"{bot.name} did not answer /healthz\n{bot.tail(40)}")

    async def stop(self) -> None:
        """Stop every bot still running (SIGTERM, then SIGKILL after a grace), close the logs."""
        for bot in self.bots:
            if bot.alive:
                bot.process.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for bot in self.bots:
            try:
                bot.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                bot.kill()
            bot.log_file.close()
        if self.http is not None:
            await self.http.close()

    def live(self) -> list[BotProcess]:
        return [bot for bot in self.bots if bot.alive]

    def describe(self) -> str:
        return "\n".join(bot.tail() for bot in self.bots)

    # -- what Slack and Buildkite send the bots -------------------------------------------------

    async def deploy(self, bot: BotProcess, pipeline: str, channel: str) -> str:
        """A signed `/deploy <pipeline>` from `channel`; returns its response_url's name."""
        name, (status, text) = await self.command(bot, "/deploy", pipeline, channel)
        # In a burst, a deploy may wait its turn behind the few the bot runs at once.
        assert status == 200 and ("Starting a build" in text or " in line " in text), (
            f"/deploy {pipeline} to {bot.name}: {status} {text}\n{bot.tail()}"
        )
        return name

    async def command(
        self, bot: BotProcess, command: str, text: str, channel: str
    ) -> tuple[str, tuple[int, str]]:
        """A signed slash command from `channel`: its response_url's name, and the answer."""
        self._responses += 1
        name = f"{command.lstrip('/')}-{self._responses}"
        body, headers = slack_requests.slash_command(
            command,
            text,
            response_url=self.slack.response_url(name),
            signing_secret=SIGNING_SECRET,
            channel_id=channel,
            channel_name=channel.lower(),
        )
        return name, await self.post(bot, "/slack/events", body, headers)

    async def post(
        self, bot: BotProcess, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, str]:
        assert self.http is not None
        async with self.http.post(f"{bot.url}{path}", data=body, headers=headers) as response:
            return response.status, await response.text()

    async def webhook(
        self, bot: BotProcess, payload: dict[str, Any], *, timestamp: int | None = None
    ) -> int | None:
        """Deliver a Buildkite webhook (token mode, or signed when `timestamp` is given);
        None when the bot could not be reached."""
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "X-Buildkite-Event": payload["event"]}
        if timestamp is None:
            headers["X-Buildkite-Token"] = WEBHOOK_TOKEN
        else:
            from app.simulators.buildkite import sign_webhook

            headers.update(sign_webhook(body, WEBHOOK_TOKEN, timestamp))
        try:
            status, _ = await self.post(bot, "/buildkite/webhook", body, headers)
        except (aiohttp.ClientError, OSError):
            return None
        return status

    def secrets_in_logs(self) -> list[str]:
        """Which bots' logs contain one of the secrets they were given (masked by position), or a
        response_url (a credential for its channel: anything under SLACK_HOOKS_URL)."""
        leaks = []
        for bot in self.bots:
            text = bot.log()
            for number, secret in enumerate(self.secrets):
                if secret in text:
                    leaks.append(f"{bot.name}: secret #{number}")
            if self.slack.hooks_url in text:
                leaks.append(f"{bot.name}: a response_url")
        return leaks


# -- what the bots were asked to do -------------------------------------------------------------


def started_builds(slack: FakeSlack, names: Iterable[str]) -> dict[str, BuildKey]:
    """The build each deploy (by response_url name) says it started, from its ephemeral answer."""
    found: dict[str, BuildKey] = {}
    wanted = set(names)
    for post in slack.responses:
        if post.name in wanted and "Started" in str(post.json.get("text", "")):
            match = _BUILD_URL.search(str(post.json["text"]))
            if match:
                found[post.name] = (match["pipeline"], int(match["n"]))
    return found


def set_state(bk: FakeBuildkite, key: BuildKey, state: str) -> None:
    """Move a build in the fake Buildkite; failing and failed builds have a failed Test job, and
    "blocked" is a build waiting on a block step (state passed, blocked), as Buildkite shows it."""
    if state == "blocked":
        bk.set_build_state(key[0], key[1], "passed", blocked=True)
        return
    failed = ("Test",) if state in {"failing", "failed"} else ()
    bk.set_build_state(key[0], key[1], state, failed_jobs=failed)


async def send_changes(
    fleet: Fleet,
    changes: Sequence[tuple[BuildKey, str]],
    *,
    rng: random.Random,
    deliver: float = 1.0,
    concurrency: int = 16,
) -> dict[str, int]:
    """Apply state changes, in random order, in the fake Buildkite and send each one's webhook
    to a random live bot, dropping a share `1 - deliver` of them; returns what became of them."""
    counts = {"changes": 0, "sent": 0, "dropped": 0, "unreachable": 0, "refused": 0}
    gate = asyncio.Semaphore(concurrency)

    async def one(key: BuildKey, state: str) -> None:
        set_state(fleet.bk, key, state)
        counts["changes"] += 1
        if rng.random() >= deliver:
            counts["dropped"] += 1
            return
        live = fleet.live()
        if not live:
            counts["unreachable"] += 1
            return
        async with gate:
            status = await fleet.webhook(rng.choice(live), fleet.bk.webhook_payload(*key))
        if status is None:
            counts["unreachable"] += 1
        elif status == 200:
            counts["sent"] += 1
        else:
            counts["refused"] += 1

    shuffled = list(changes)
    rng.shuffle(shuffled)
    await asyncio.gather(*(one(key, state) for key, state in shuffled))
    return counts


# -- what reached the fake Slack ----------------------------------------------------------------


@dataclass
class BuildThread:
    """A build's root messages in Slack and the replies in their threads, by kind."""

    roots: list[RecordedCall] = field(default_factory=list)
    replies: dict[str, list[RecordedCall]] = field(default_factory=lambda: defaultdict(list))


def reply_kind(text: str) -> str:
    if "started running" in text:
        return "running"
    if "is failing" in text:
        return "failing"
    return "final"


def threads(slack: FakeSlack) -> dict[BuildKey, BuildThread]:
    """Every build's messages, read from successful chat.postMessage calls."""
    found: dict[BuildKey, BuildThread] = defaultdict(BuildThread)
    for call in slack.posts():
        text = str(call.args.get("text", ""))
        if not call.args.get("thread_ts"):
            match = _ROOT_TEXT.match(text)
            if match:
                found[(match["pipeline"], int(match["number"]))].roots.append(call)
            continue
        url = _BUILD_URL.search(text)
        if url:
            found[(url["pipeline"], int(url["n"]))].replies[reply_kind(text)].append(call)
    return found


def shown_state(slack: FakeSlack, root: RecordedCall) -> str | None:
    """The build state a root message shows now (after every edit)."""
    message = slack.message(str(root.response["channel"]), str(root.response["ts"]))
    match = _ROOT_TEXT.match(str(message.get("text", "")))
    return _LABELS.get(match["label"]) if match else None


def final_posted(slack: FakeSlack, keys: Iterable[BuildKey]) -> bool:
    found = threads(slack)
    return all(found[key].replies.get("final") for key in keys)


def last_final_at(slack: FakeSlack, keys: Iterable[BuildKey]) -> float:
    """When (time.monotonic) the latest of these builds' final replies was posted."""
    found = threads(slack)
    return max(
        (min(c.time for c in found[key].replies["final"]) for key in keys), default=float("nan")
    )


@dataclass
class Audit:
    """What every build got in Slack, against what Buildkite says about it."""

    builds: int
    roots: int
    finals: int
    duplicate_roots: list[BuildKey]
    duplicate_finals: list[BuildKey]
    missing_roots: list[BuildKey]
    missing_finals: list[BuildKey]
    wrong_state: list[tuple[BuildKey, str | None, str]]
    wrong_thread: list[BuildKey]

    @property
    def losses(self) -> int:
        return len(
            set(self.missing_roots) | set(self.missing_finals) | {k for k, *_ in self.wrong_state}
        )

    @property
    def duplicates(self) -> int:
        return len(self.duplicate_roots) + len(self.duplicate_finals)

    def problems(self) -> str:
        parts: dict[str, list[Any]] = {
            "duplicate roots": self.duplicate_roots,
            "duplicate finals": self.duplicate_finals,
            "missing roots": self.missing_roots,
            "missing finals": self.missing_finals,
            "wrong final state (build, shown, true)": self.wrong_state,
            "reply outside its build's thread": self.wrong_thread,
        }
        return "; ".join(f"{name}: {value[:10]}" for name, value in parts.items() if value)


def audit(slack: FakeSlack, bk: FakeBuildkite, keys: Iterable[BuildKey]) -> Audit:
    """Exactly one root and one final reply per build, in its thread, showing its true state."""
    found = threads(slack)
    keys = sorted(keys)
    result = Audit(len(keys), 0, 0, [], [], [], [], [], [])
    for key in keys:
        thread = found.get(key, BuildThread())
        truth = str(bk.build(*key)["state"])
        finals = thread.replies.get("final", [])
        result.roots += len(thread.roots)
        result.finals += len(finals)
        if not thread.roots:
            result.missing_roots.append(key)
        if len(thread.roots) > 1:
            result.duplicate_roots.append(key)
        if not finals:
            result.missing_finals.append(key)
        if len(finals) > 1:
            result.duplicate_finals.append(key)
        if thread.roots:
            shown = shown_state(slack, thread.roots[-1])
            said = [c for c in finals if STATE_LABEL[truth].lower() not in str(c.args["text"])]
            if shown != truth or said:
                result.wrong_state.append((key, shown, truth))
            root_ts = {str(r.response["ts"]) for r in thread.roots}
            replies = [c for calls in thread.replies.values() for c in calls]
            if any(str(c.args["thread_ts"]) not in root_ts for c in replies):
                result.wrong_thread.append(key)
    return result


def figures(title: str, values: dict[str, Any]) -> str:
    """One line of measured figures, printed so that `pytest -rA` (or -s) shows them."""
    shown = ", ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    line = f"[fault figures] {title}: {shown}"
    print(line)
    return line


def _run_bot() -> None:
    """`python -m app`, with the build lock (and so the reclaim delay) from FAULT_LOCK_TTL_MS."""
    import runpy
    from dataclasses import replace

    from app import main
    from app.settings import Settings
    from app.tuning import DEFAULT, Tuning

    lock_ms = os.environ.get("FAULT_LOCK_TTL_MS")
    if lock_ms:
        tracking = replace(
            DEFAULT.tracking,
            lock_ttl_ms=int(lock_ms),
            lock_renew_ms=int(lock_ms) // 3,
            reclaim_idle_ms=2 * int(lock_ms),
            record_patience=int(lock_ms) / 2000,
        )
        run = main.run

        def run_tuned(settings: Settings, tuning: Tuning = DEFAULT) -> None:
            run(settings, replace(tuning, tracking=tracking))

        main.run = run_tuned  # what `python -m app` calls
    runpy.run_module("app", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _run_bot()
