"""Property-based fuzzing of everything a stranger's (signed) input reaches, through the real port.

Hypothesis writes slash commands, button clicks with any `value` on every action the bot handles,
modal submissions for every callback_id, and Buildkite webhook bodies, mixing the bot's own
vocabulary with Slack markup (`<!channel>`, `<@U0EVIL>`, `<https://evil.example|…>`, backticks).
Each case is sent, correctly signed, to one running bot against the Slack and Buildkite fakes.
The properties, after every case:

- the bot never answers 500 and logs no ERROR and no traceback;
- nothing outside the documented request shapes reaches Buildkite (its fake records any such
  request in `unexpected`, which must stay empty);
- no markup that came from the input is live in any Slack message: every `<!…>`, `<@…>`, `<#…>`
  and `<url…>` in what reached the Slack fake is one the bot wrote itself (the clicking user, the
  channel, a date, a link to Buildkite).

Hypothesis runs async code poorly inside pytest-asyncio's loop, so the bot and the fakes run on a
loop in a thread of their own for the whole module, and each case is handed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, WEBHOOK_TOKEN, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack.ids import ActionId, CallbackId

T = TypeVar("T")

CHANNEL, USER = "C0CHAN", "U0USER"
#: Cases per strategy (four of them); FUZZ_EXAMPLES=1000 for a longer run.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
CASE_TIMEOUT = 30.0

#: What a person might put anywhere: Slack markup that must never become live, and the
#: characters that break out of the bot's own formatting.
HOSTILE = [
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<!subteam^S0EVIL>",
    "<@U0EVIL>",
    "<@W0EVIL|eve>",
    "<#C0EVIL>",
    "<https://evil.example/login|Approve here>",
    "<!channel|all of you>",
    "<@U0EVIL|the boss>",
    "<https://evil.example|click me>",
    "<http://evil.example>",
    "<mailto:eve@evil.example|mail>",
    "<https://buildkite.com.evil.example/x>",
    "https://evil.example/acme/deploy-prod/builds/1",
    "```",
    "`",
    "|",
    "&",
    "&amp;",
    "&lt;!channel&gt;",
    "*bold*",
    "\u202e",
    "\x1b[31m",
]
#: The bot's vocabulary, so that cases reach past the first "that is not a command".
WORDS = [
    "deploy-prod",
    "forms",
    "lock",
    "unlock",
    "locks",
    "audit",
    "2h",
    "30m",
    "main",
    "HEAD",
    "abc1234",
    "DRY_RUN=1",
    "BUILDKITE_AGENT_ACCESS_TOKEN=x",
    "help",
    "1",
    "#2",
    "pipelines",
    "builds",
    "agents",
    "whoami",
    "health",
    "pipeline",
    "create",
    "update",
    "delete",
    "state=failed",
    "branch=main",
    "description=x",
    "queue=default",
    "https://buildkite.com/acme/deploy-prod/builds/1",
    "https://buildkite.com/other/deploy-prod/builds/1",
]

text_chars = st.characters(blacklist_categories=["Cs"])
# Markup is drawn often: a case without any proves little.
word = st.one_of(
    st.sampled_from(HOSTILE), st.sampled_from(WORDS + HOSTILE), st.text(text_chars, max_size=12)
)
free_text = st.lists(word, max_size=8).map(" ".join)
any_string = st.one_of(free_text, st.text(text_chars, max_size=40))


def slack_escaped(text: str) -> str:
    """Command text as Slack sends it: what people type, with &, < and > escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- what the bot may write itself ---------------------------------------------------------------

#: Markup the bot writes: the clicking user and the channel (both from Slack's own fields), a
#: date, a link to Buildkite or to a GitHub compare. Anything else in angle brackets came from
#: the input.
_OURS = (
    rf"<@{USER}>",
    rf"<#{CHANNEL}>",
    r"<!date\^\d+\^[^|>]*\|[^>]*>",
    r"<https://(?:[a-z0-9-]+\.)*buildkite\.com/[^|>\s]*\|[^>]*>",
    r"<https://github\.com/[^|>\s]*\|[^>]*>",
)
LIVE_MARKUP = re.compile(r"<[!@#]|<[a-z]+:", re.IGNORECASE)


def live_markup(text: str) -> list[str]:
    """Markup in `text` that is not the bot's own (see `_OURS`)."""
    stripped = re.sub("|".join(_OURS), "", text)
    return [stripped[m.start() : m.start() + 60] for m in LIVE_MARKUP.finditer(stripped)]


def slack_texts(slack: FakeSlack, calls: int, responses: int) -> str:
    """Every text Slack renders as mrkdwn in what the Slack fake received since these counts.

    That is a message's top-level `text` (its notification, mrkdwn too) and every `mrkdwn` text
    object in its blocks or view; `plain_text` objects and button values are shown as they are.
    """
    bodies = [c.args for c in slack.calls[calls:]] + [p.json for p in slack.responses[responses:]]
    return "\n".join(text for body in bodies for text in _rendered(body))


def _rendered(body: dict[str, Any]) -> Iterator[str]:
    if isinstance(body.get("text"), str):
        yield body["text"]
    for key in ("blocks", "view"):
        value = body.get(key)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        yield from _mrkdwn(value)


def _mrkdwn(node: Any) -> Iterator[str]:
    if isinstance(node, list):
        for item in node:
            yield from _mrkdwn(item)
    elif isinstance(node, dict):
        if node.get("type") == "mrkdwn" and isinstance(node.get("text"), str):
            yield node["text"]
        elif node.get("type") != "plain_text":
            for value in node.values():
                yield from _mrkdwn(value)


# -- the bot on a loop of its own ------------------------------------------------------------------


class ProblemLog(logging.Handler):
    """Collects every ERROR record and every record with a traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()}")


class Harness:
    """One bot and its fakes on a background loop; `run` hands it a coroutine and waits."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.problems = ProblemLog()
        self.cases: dict[str, int] = {}
        self.bot: BotClient
        self.slack: FakeSlack
        self.bk: FakeBuildkite
        self.message_ts = ""
        self.blocked_job = ""
        self.webhook_builds = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CASE_TIMEOUT)

    @contextlib.contextmanager
    def running(self) -> Iterator[Harness]:
        self.thread.start()
        logging.getLogger().addHandler(self.problems)
        started = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)
        try:
            self.ready.wait(CASE_TIMEOUT)
            if started.done():
                started.result()  # the bot failed to start: say why
            yield self
        finally:
            logging.getLogger().removeHandler(self.problems)
            if self.stop is not None:
                self.loop.call_soon_threadsafe(self.stop.set)
            with contextlib.suppress(Exception):
                started.result(CASE_TIMEOUT)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(CASE_TIMEOUT)
            self.loop.close()

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        client = redis.Redis.from_url(self.redis_url)
        await client.flushdb()
        await client.aclose()
        policy = self.tmp / "policy.yml"
        # Every build a webhook tells of is announced, so webhook fields reach a new message.
        policy.write_text(
            "notifications:\n"
            f"  - pipelines: ['*']\n    channel: {CHANNEL}\n"
            "    events: [started, failed, passed, blocked]\n"
        )
        async with contextlib.AsyncExitStack() as stack:
            self.slack = await stack.enter_async_context(FakeSlack())
            self.bk = await stack.enter_async_context(FakeBuildkite(rate_limit=10**9))
            self.bk.add_pipeline("deploy-prod")
            self.bk.add_pipeline(
                "forms",
                block="Approve <!channel>",
                block_fields=[{"text": "Notes <@U0EVIL>", "key": "notes", "required": False}],
            )
            self.bot = await stack.enter_async_context(
                running_bot(self.slack, self.bk, self.redis_url, policy_file=str(policy))
            )
            await self._seed()
            self.ready.set()
            await self.stop.wait()

    async def _seed(self) -> None:
        """A tracked build to click on and send webhooks about, and one waiting on a block."""
        await self.bot.command("/deploy", "deploy-prod")
        await self.bot.command("/deploy", "forms")
        posts = await self.slack.wait_for(
            lambda: len(self.slack.posts(CHANNEL)) >= 2 and self.slack.posts(CHANNEL)
        )
        assert posts
        self.message_ts = str(posts[0].response["ts"])
        self.bk.set_build_state("forms", 1, "blocked")
        await self.bot.webhook(self.bk.webhook_payload("forms", 1))
        build = self.bk.build("forms", 1)
        self.blocked_job = next(j["id"] for j in build["jobs"] if j["type"] == "manual")
        await self.settle()

    async def settle(self) -> None:
        """Wait until the bot has finished what the last request started (its messages too)."""
        await self.bot.settled(CASE_TIMEOUT)

    def case(
        self, kind: str, send: Callable[[BotClient, aiohttp.ClientSession], Awaitable[int]]
    ) -> None:
        """Send one case and check every property on what it caused."""
        self.cases[kind] = self.cases.get(kind, 0) + 1
        calls, responses = len(self.slack.calls), len(self.slack.responses)
        problems = len(self.problems.records)

        async def go() -> int:
            status = await send(self.bot, self.bot.http)
            await self.settle()
            return status

        status = self.run(go())
        assert status < 500, f"{kind}: answered {status}"
        assert self.bk.unexpected == [], f"{kind}: unexpected Buildkite requests"
        logged = self.problems.records[problems:]
        assert logged == [], f"{kind}: logged {logged}"
        live = live_markup(slack_texts(self.slack, calls, responses))
        assert live == [], f"{kind}: input markup reached Slack live: {live}"


#: One bot runs through the whole module (see `harness`): conftest leaves its Redis unflushed.
SHARED_BOT = True


@pytest.fixture(scope="module")
def harness(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with Harness(redis_url, tmp_path_factory.mktemp("fuzz")).running() as h:
        yield h
        # Whatever arrived after its case was checked is checked here, once more, as a whole.
        h.run(h.settle())
        assert live_markup(slack_texts(h.slack, 0, 0)) == []
        assert h.bk.unexpected == []
        assert h.problems.records == []
        print(f"\nfuzz cases run: {h.cases} ({sum(h.cases.values())} in all)")


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run, so a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _post(http: aiohttp.ClientSession, bot: BotClient, body: bytes, headers: Any) -> int:
    async with http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


# -- slash commands ------------------------------------------------------------------------------


#: How commands start, so that most cases get past the parser to a message with their text.
STARTS = {
    "/deploy": [
        "",
        "deploy-prod",
        "deploy-prod main HEAD",
        "lock deploy-prod",
        "lock deploy-prod 2h",
        "lock deploy-prod 30m freeze",
        "unlock deploy-prod",
        "locks",
        "audit",
    ],
    "/cancel": ["", "deploy-prod"],
    "/rebuild": ["", "deploy-prod"],
    "/buildkite": [
        "",
        "pipelines",
        "builds deploy-prod",
        "builds",
        "agents",
        "pipeline update deploy-prod description=",
        "pipeline create",
        "build deploy-prod",
    ],
}


@FUZZ
@given(
    command_start=st.sampled_from(
        [(command, start) for command, starts in STARTS.items() for start in starts]
    ),
    text=free_text,
    escaped=st.booleans(),
)
def test_slash_commands(
    harness: Harness, command_start: tuple[str, str], text: str, escaped: bool
) -> None:
    command, start = command_start
    typed = f"{start} {slack_escaped(text) if escaped else text}".strip()

    async def send(bot: BotClient, http: aiohttp.ClientSession) -> int:
        _, url = bot.new_response_url()
        body, headers = slack_requests.slash_command(
            command, typed, response_url=url, signing_secret=SIGNING_SECRET
        )
        return await _post(http, bot, body, headers)

    harness.case(f"command {command}", send)


# -- button clicks -------------------------------------------------------------------------------

slug_like = st.one_of(st.sampled_from(["deploy-prod", "forms", "gone"]), any_string)
number_like = st.one_of(st.integers(-2, 3), st.integers(), st.sampled_from([10**9, 2**63]))
field_values = st.fixed_dictionaries(
    {},
    optional={
        "pipeline": slug_like,
        "number": number_like,
        "job": st.one_of(st.just("JOB"), any_string),
        "id": st.one_of(st.just("0123456789abcdef"), any_string),
        "page": number_like,
        "filter": any_string,
        "queue": any_string,
        "state": st.one_of(st.just("failed"), any_string),
        "branch": any_string,
        "name": any_string,
    },
)
button_value = st.one_of(
    st.text(text_chars, max_size=60),
    field_values.map(json.dumps),
    st.just(json.dumps({"pipeline": "deploy-prod", "number": 1})),
    st.just(json.dumps({"pipeline": "forms", "number": 1, "job": "JOB"})),
)


@FUZZ
@given(
    action_id=st.sampled_from([a.value for a in ActionId] + ["not_ours"]),
    value=button_value,
    ephemeral=st.booleans(),
)
def test_button_values(harness: Harness, action_id: str, value: str, ephemeral: bool) -> None:
    value = value.replace("JOB", harness.blocked_job)

    async def send(bot: BotClient, http: aiohttp.ClientSession) -> int:
        _, url = bot.new_response_url()
        body, headers = slack_requests.block_action(
            action_id,
            value,
            response_url=url,
            signing_secret=SIGNING_SECRET,
            channel_id=CHANNEL,
            message_ts=harness.message_ts,
            ephemeral=ephemeral,
        )
        return await _post(http, bot, body, headers)

    harness.case(f"click {action_id}", send)


# -- modal submissions ---------------------------------------------------------------------------

metadata = st.one_of(
    any_string,
    st.fixed_dictionaries(
        {},
        optional={
            "pipeline": slug_like,
            "number": number_like,
            "job": st.one_of(st.just("JOB"), any_string),
            "channel": st.one_of(st.just(CHANNEL), any_string),
            "thread_ts": st.one_of(st.just("1.2"), any_string),
            "label": any_string,
        },
    ).map(json.dumps),
    st.just(json.dumps({"pipeline": "forms", "number": 1, "job": "JOB", "channel": CHANNEL})),
    st.just(json.dumps({"channel": CHANNEL})),
    st.just(json.dumps({"channel": CHANNEL, "pipeline": "deploy-prod"})),
)
block_ids = st.sampled_from(
    ["field:notes", "field:other", "name", "repository", "default_branch", "description", "steps"]
)
state_values = st.dictionaries(block_ids, st.one_of(st.none(), any_string), max_size=5)


@FUZZ
@given(
    callback_id=st.sampled_from(
        [CallbackId.UNBLOCK, CallbackId.PIPELINE_CREATE, CallbackId.PIPELINE_UPDATE, "not_ours"]
    ),
    private_metadata=metadata,
    values=state_values,
)
def test_view_submissions(
    harness: Harness, callback_id: str, private_metadata: str, values: dict[str, str | None]
) -> None:
    private_metadata = private_metadata.replace("JOB", harness.blocked_job)
    blocks = [
        {"type": "input", "block_id": block_id, "element": {"type": "plain_text_input"}}
        for block_id in values
    ]

    async def send(bot: BotClient, http: aiohttp.ClientSession) -> int:
        body, headers = slack_requests.view_submission(
            callback_id,
            {block_id: {"value": value} for block_id, value in values.items()},
            private_metadata,
            view={"blocks": blocks},
            signing_secret=SIGNING_SECRET,
        )
        return await _post(http, bot, body, headers)

    harness.case(f"view {callback_id}", send)


# -- Buildkite webhooks --------------------------------------------------------------------------

BUILD_FIELDS = ["message", "branch", "commit", "web_url", "state", "number", "source", "id"]
BUILD_STATES = ["scheduled", "running", "failing", "failed", "passed", "canceled", "blocked"]
hostile_value = st.one_of(
    any_string,
    st.sampled_from(HOSTILE),
    number_like,
    st.none(),
    st.sampled_from(["passed", "failed", "running", "blocked", "canceled", "weird"]),
    st.lists(st.integers(), max_size=2),
)


@FUZZ
@given(
    event=st.sampled_from(
        [
            *("build.scheduled", "build.running", "build.finished", "build.failing"),
            *("job.finished", "ping", "not.ours"),
        ]
    ),
    pipeline=st.sampled_from(["deploy-prod", "forms"]),
    state=st.sampled_from(BUILD_STATES),
    build_changes=st.dictionaries(st.sampled_from(BUILD_FIELDS), hostile_value, max_size=4),
    person=st.one_of(st.none(), st.sampled_from(HOSTILE), any_string),
    pipeline_changes=st.dictionaries(
        st.sampled_from(["slug", "name", "description", "web_url"]), hostile_value, max_size=2
    ),
    raw=st.one_of(st.none(), st.binary(max_size=40), st.text(text_chars, max_size=40)),
)
def test_webhook_bodies(
    harness: Harness,
    event: str,
    pipeline: str,
    state: str,
    build_changes: dict[str, Any],
    person: str | None,
    pipeline_changes: dict[str, Any],
    raw: bytes | str | None,
) -> None:
    payload = harness.bk.webhook_payload(pipeline, 1)
    payload["event"] = event
    # A build the bot has not seen yet, so that the route announces it in a new message.
    harness.webhook_builds += 1
    blocked = state == "blocked"
    payload["build"].update(
        id=f"fuzz-{harness.webhook_builds}",
        number=100 + harness.webhook_builds,
        state="passed" if blocked else state,
        blocked=blocked,
    )
    payload["build"].update(build_changes)
    payload["pipeline"].update(pipeline_changes)
    if person is not None:
        payload["build"]["author"] = {"name": person, "email": "eve@evil.example"}
        payload["build"]["creator"] = {"id": "x", "name": person}
    body = (
        json.dumps(payload).encode()
        if raw is None
        else (raw if isinstance(raw, bytes) else raw.encode())
    )

    async def send(bot: BotClient, http: aiohttp.ClientSession) -> int:
        headers = {
            "Content-Type": "application/json",
            "X-Buildkite-Event": event,
            "X-Buildkite-Token": WEBHOOK_TOKEN,
        }
        async with http.post(f"{bot.base}/buildkite/webhook", data=body, headers=headers) as r:
            await r.read()
            return r.status

    harness.case(f"webhook {event}" if raw is None else "webhook raw body", send)


# -- the property checks themselves ----------------------------------------------------------------


def test_live_markup_finds_what_came_from_the_input() -> None:
    ours = (
        f"<@{USER}> locked it in <#{CHANNEL}>, <!date^1700000000^{{date_short}}|later>, "
        "<https://buildkite.com/acme/x/builds/1|x #1>, <https://github.com/a/b/compare/1...2|c>"
    )
    assert live_markup(ours) == []
    for theirs in HOSTILE[:14]:
        if theirs.startswith("<"):
            assert live_markup(f"ok {theirs}") != [], theirs
    assert live_markup("&lt;!channel&gt; &lt;@U0EVIL&gt; &lt;https://evil.example|x&gt;") == []
