"""Try the bot locally: the real bot, wired to fakes of Slack and Buildkite on 127.0.0.1.

Type slash commands as you would in Slack (`/deploy web main`); the bot's messages are printed,
their buttons numbered (type the number, or the button's label, to press it). Builds move on by
themselves (scheduled, running, then passed, or failed with --fail) and reach the bot as signed
webhooks. No credentials are needed and nothing leaves this machine; tracking uses the embedded
store unless --redis-url is given.

    python -m app sandbox
    python -m app sandbox --run "/deploy web main" --run Rebuild   # print a transcript
    python -m app sandbox --script demo.txt --fail --speed 4

The simulators of Slack and Buildkite (app.simulators) ship with the package, so it runs from
any directory of an installed bot, the Docker image's included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from app.ops import logs
from app.settings import Settings

PIPELINES = ("web", "api")
CHANNEL = "C0CHAN"
#: The Slack emoji the bot uses, drawn for a terminal: name, then emoji.
_EMOJI = """
hourglass_flowing_sand ⏳  hourglass ⌛  arrow_forward ▶️  warning ⚠️  white_check_mark ✅  x ❌
no_entry ⛔  no_entry_sign 🚫  double_vertical_bar ⏸️  fast_forward ⏩  heavy_minus_sign ➖
repeat 🔁  lock 🔒  unlock 🔓  rocket 🚀  boom 💥  raised_hand ✋  octagonal_sign 🛑  scroll 📜
building_construction 🏗️  white_circle ⚪  large_green_circle 🟢  wastebasket 🗑️  shield 🛡️
robot_face 🤖  bar_chart 📊  information_source ℹ️
"""  # noqa: RUF001
EMOJI = dict(zip(_EMOJI.split()[::2], _EMOJI.split()[1::2], strict=True))
#: Seconds (at speed 1) at which a simulated build reaches each state.
PASSING = ((1.5, "running"), (4.0, "passed"))
FAILING = ((1.5, "running"), (3.0, "failing"), (5.0, "failed"))
FINAL = {"passed", "failed", "canceled", "skipped", "not_run"}
STEP_TIMEOUT = 60.0
HELP = (
    "Type a slash command (/deploy web main, /cancel web 1, /rebuild web 1, /deploy help), "
    "a button's number or label to press it, or quit."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fail", action="store_true", help="make every build fail")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="how fast builds move (2 = twice as fast)"
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="LINE",
        help="a line to run as if typed (repeatable); prints the transcript and exits",
    )
    parser.add_argument("--script", metavar="FILE", help="run the lines of FILE (# comments)")
    parser.add_argument("--redis-url", help="track builds in this Redis instead of in memory")


def main(args: argparse.Namespace) -> int:
    try:
        from app.simulators.buildkite import FakeBuildkite  # noqa: F401
        from app.simulators.slack import FakeSlack  # noqa: F401
    except ImportError:
        print(
            "The sandbox needs the Slack and Buildkite simulators of app.simulators, which this "
            "installation lacks: reinstall the bot's package.",
            file=sys.stderr,
        )
        return 2
    if args.speed <= 0:
        print("--speed must be positive", file=sys.stderr)
        return 2
    lines: list[str] | None = None
    if args.script:
        with open(args.script, encoding="utf-8") as script:
            lines = script.read().splitlines()
    if args.run:
        lines = (lines or []) + args.run
    if lines is None and not sys.stdin.isatty():
        lines = sys.stdin.read().splitlines()
    logs.configure("WARNING", [])
    try:
        return asyncio.run(run(args, lines, sys.stdout))
    except KeyboardInterrupt:
        return 130


async def run(args: argparse.Namespace, script: list[str] | None, out: TextIO) -> int:
    """Run the sandbox: the lines of `script`, or what is typed when it is None."""
    from app.main import start_bot
    from app.simulators.bot import SIGNING_SECRET, BotClient
    from app.simulators.buildkite import FakeBuildkite
    from app.simulators.slack import FakeSlack

    async with FakeSlack() as slack, FakeBuildkite() as bk:
        for slug in PIPELINES:
            bk.add_pipeline(slug, default_branch="main")
        settings = Settings(
            slack_bot_token=slack.bot_token,
            slack_signing_secret=SIGNING_SECRET,
            slack_app_token=None,
            slack_api_url=slack.api_url,
            slack_hooks_url=slack.hooks_url,
            buildkite_api_token=bk.token,
            buildkite_org=bk.org,
            buildkite_api_url=bk.url,
            buildkite_webhook_token=bk.webhook_token,
            redis_url=args.redis_url,
            log_level="WARNING",
            poll_interval=60,
            _env_file=None,
        )
        async with start_bot(settings, host="127.0.0.1", port=0) as running:
            # The fake has no rate limit: Slack's pacing follows the sandbox's clock.
            running.services.outbox.post_interval /= args.speed
            running.services.outbox.edit_interval /= args.speed
            client = BotClient(running, slack, bk)
            session = Session(slack, bk, client, out, fail=args.fail, speed=args.speed)
            simulator = asyncio.create_task(session.simulate_builds())
            try:
                session.say(
                    f"Sandbox: the bot listens on {client.base}, against fake Slack and "
                    f"Buildkite. You are @alice in #deploys; pipelines: {', '.join(PIPELINES)}; "
                    f"builds {'fail' if args.fail else 'pass'}, speed ×{args.speed:g}."  # noqa: RUF001
                )
                if script is None:
                    session.say(HELP)
                    await session.interactive()
                else:
                    await session.scripted(script)
            finally:
                simulator.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await simulator
                await client.close()
        for name, fake in (("Slack", slack.unexpected), ("Buildkite", bk.unexpected)):
            for problem in fake:
                print(f"fake {name} did not expect: {problem}", file=sys.stderr)
    return 0


@dataclass
class Choice:
    """A button shown to the user, by the number printed next to it."""

    label: str
    action_id: str
    channel: str
    message: dict[str, Any]
    confirm: str | None
    #: In a message only the user sees: Slack's click then carries no `message`.
    ephemeral: bool = False


class Session:
    """One sandbox session: lines typed in, what the bot did in Slack printed out."""

    def __init__(
        self, slack: Any, bk: Any, client: Any, out: TextIO, *, fail: bool, speed: float
    ) -> None:
        self.slack, self.bk, self.client, self.out = slack, bk, client, out
        self.timeline = FAILING if fail else PASSING
        self.speed = speed
        self.choices: dict[int, Choice] = {}
        self.shown_calls = 0
        self.shown_responses = 0
        self.last_activity = time.monotonic()
        self.reader: asyncio.StreamReader | None = None  # stdin, when interactive

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- input -----------------------------------------------------------------------------

    async def scripted(self, lines: list[str]) -> None:
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            self.say(f"> {line}")
            if not await self.handle(line):
                break
            await self.settle()

    async def interactive(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
        )
        printer = asyncio.create_task(self.keep_printing())
        try:
            while line := (await reader.readline()).decode():
                if not await self.handle(line.strip()):
                    break
        finally:
            printer.cancel()
            transport.close()
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(sys.stdin.fileno(), True)

    async def handle(self, line: str) -> bool:
        """Act on one line; False to stop."""
        if line in ("quit", "exit", "q"):
            return False
        self.last_activity = time.monotonic()  # the bot gets a moment to answer
        if line.startswith("/"):
            command, _, text = line.partition(" ")
            self.flush()
            resp, _, payload = await self.client.command(command, text.strip())
            if resp.status != 200:
                self.say(
                    f"  ✗ the bot answered HTTP {resp.status}: is {command} one of its commands?"
                )
            elif payload.get("text"):
                self.say(indent("only you", render_text(payload["text"], self.slack)))
        elif line and (choice := self.find_choice(line)) is not None:
            await self.press(choice)
        elif line:  # help, or anything else
            self.say(HELP)
        self.flush()
        return True

    def find_choice(self, line: str) -> Choice | None:
        if line.isdigit():
            return self.choices.get(int(line))
        labelled = [n for n, c in self.choices.items() if c.label.lower() == line.lower()]
        return self.choices[max(labelled)] if labelled else None

    async def press(self, choice: Choice) -> None:
        if choice.confirm:
            if self.reader is not None:
                self.say(f"  {choice.confirm} [y/N]")
                if not (await self.reader.readline()).decode().strip().lower().startswith("y"):
                    return
            else:
                self.say(f"  (confirmed: {choice.confirm})")
        current = self.slack.messages.get(choice.channel, {}).get(choice.message["ts"])
        try:
            if choice.ephemeral:
                await self.client.click(
                    choice.action_id,
                    None,
                    channel=choice.channel,
                    message_ts=choice.message["ts"],
                    message_blocks=choice.message.get("blocks") or [],
                    ephemeral=True,
                )
                return
            await self.client.click(
                choice.action_id,
                None,
                channel=choice.channel,
                message_ts=choice.message["ts"],
                message=current or choice.message,
            )
        except ValueError:
            self.say(f"  That {choice.label} button is no longer on its message.")

    # -- output ----------------------------------------------------------------------------

    async def keep_printing(self) -> None:
        while True:
            self.flush()
            await asyncio.sleep(0.1)

    async def settle(self) -> None:
        """Wait until the builds rest and neither they nor the bot changed anything for a while."""
        quiet = 0.5 + 1.5 / self.speed
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            self.flush()
            busy = any(b["state"] not in FINAL and not b["blocked"] for b in self.bk.builds)
            if not busy and time.monotonic() - self.last_activity > quiet:
                return
            await asyncio.sleep(0.05)
        self.say(f"  (still busy after {STEP_TIMEOUT:.0f} s; going on)")

    def flush(self) -> None:
        """Print what the bot did in Slack since the last flush, oldest first."""
        calls = self.slack.calls[self.shown_calls :]
        responses = self.slack.responses[self.shown_responses :]
        self.shown_calls += len(calls)
        self.shown_responses += len(responses)
        events = [(c.time, 0, c) for c in calls] + [(r.time, 1, r) for r in responses]
        for _, kind, event in sorted(events, key=lambda e: (e[0], e[1])):
            text = self.show_call(event) if kind == 0 else self.show_response(event)
            if text:
                self.last_activity = time.monotonic()
                self.say(text)

    def show_call(self, call: Any) -> str | None:
        if call.method not in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            return None
        channel = str(call.response.get("channel") or call.args.get("channel", "?"))
        where = "#" + str(self.slack.channels.get(channel, {}).get("name", channel))
        if not call.ok:
            return f"  ✗ {call.method} to {where} failed: {call.response.get('error')}"
        ts = str(call.response.get("ts") or call.args.get("ts", ""))
        message = self.slack.messages.get(channel, {}).get(ts) or {"ts": ts, **call.args}
        thread = call.args.get("thread_ts")
        if call.method == "chat.update":
            label = f"{where}, message edited"
        elif call.method == "chat.postEphemeral":
            label = "only you"
        elif thread:
            parent = self.slack.messages.get(channel, {}).get(thread, {})
            title = render_text(str(parent.get("text", "")), self.slack).split(":")[0]
            label = f"{where}, thread of {title}"
            label += " (also sent to the channel)" if call.args.get("reply_broadcast") else ""
        else:
            label = f"{where}, new message"
        return indent(label, self.render(call.args, channel, message))

    def show_response(self, post: Any) -> str | None:
        body = post.json
        if body.get("delete_original"):
            return "  (the bot deleted the message you clicked)"
        in_channel = body.get("response_type") == "in_channel"
        label = "#deploys" if in_channel else "only you"
        if body.get("replace_original"):
            label += " (replacing the message you clicked)"
        message = {"ts": f"response-{post.time}", **body}
        if not in_channel:  # an ephemeral message, with the ts Slack would give it
            text, blocks = str(body.get("text", "")), list(body.get("blocks") or [])
            message["ts"] = self.slack.add_ephemeral(CHANNEL, "U0USER", text, blocks=blocks)
            message["is_ephemeral"] = True
        return indent(label, self.render(body, CHANNEL, message))

    def render(self, content: dict[str, Any], channel: str, message: dict[str, Any]) -> str:
        lines: list[str] = []
        for block in content.get("blocks") or []:
            kind = block.get("type")
            if kind in ("section", "header") and block.get("text"):
                lines.append(render_text(block["text"].get("text", ""), self.slack))
            if kind == "section" and block.get("fields"):
                fields = [render_text(f.get("text", ""), self.slack) for f in block["fields"]]
                lines.append(" · ".join(f.replace("\n", ": ", 1) for f in fields))
            elif kind == "context":
                texts = [e.get("text", "") for e in block.get("elements", []) if "text" in e]
                lines.append(render_text(" ".join(texts), self.slack))
            elif kind == "actions":
                buttons = [self.button(e, channel, message) for e in block["elements"]]
                lines.append(" · ".join(buttons))
            elif kind == "divider":
                lines.append("───")
        if not lines:
            lines.append(render_text(str(content.get("text", "")), self.slack))
        return "\n".join(lines)

    def button(self, element: dict[str, Any], channel: str, message: dict[str, Any]) -> str:
        label = render_text(str(element.get("text", {}).get("text", "?")), self.slack)
        if element.get("url") and not element.get("value"):
            return f"{label} ({element['url']})"
        number = max(self.choices, default=0) + 1
        confirm = element.get("confirm")
        question = confirm and render_text(confirm.get("text", {}).get("text", ""), self.slack)
        self.choices[number] = Choice(
            label,
            element["action_id"],
            channel,
            message,
            question,
            ephemeral=bool(message.get("is_ephemeral")),
        )
        return f"[{number}] {label}"

    # -- Buildkite moving builds along -----------------------------------------------------

    async def simulate_builds(self) -> None:
        """Move every unfinished build along the timeline, with a signed webhook per change."""
        born: dict[str, float] = {}
        url = f"{self.client.base}/buildkite/webhook"
        while True:
            for build in list(self.bk.builds):
                if build["state"] in FINAL or build["blocked"]:
                    continue
                age = time.monotonic() - born.setdefault(build["id"], time.monotonic())
                state = build["state"]
                for at, reached in self.timeline:
                    if age * self.speed >= at:
                        state = reached
                if state != build["state"]:
                    slug, number = build["pipeline"]["slug"], build["number"]
                    failed = ["Test"] if state in ("failing", "failed") else []
                    self.bk.set_build_state(slug, number, state, failed_jobs=failed)
                    payload = self.bk.webhook_payload(slug, number)
                    with contextlib.suppress(OSError):
                        await self.bk.send_webhook(url, payload, mode="signature")
                    self.last_activity = time.monotonic()
            await asyncio.sleep(0.05)


def render_text(text: str, slack: Any) -> str:
    """Slack mrkdwn for a terminal: links as `label (url)`, mentions by name, emoji drawn."""

    def mention(match: re.Match[str]) -> str:
        user = slack.users.get(match.group(1), {})
        return "@" + str(user.get("name", match.group(1)))

    text = re.sub(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>", mention, text)
    text = re.sub(r"<#C[A-Z0-9]+\|([^>]+)>", r"#\1", text)
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", r"\2 (\1)", text)
    text = re.sub(r"<(https?://[^>]+)>", r"\1", text)
    text = re.sub(r":([a-z0-9_+-]+):", lambda m: EMOJI.get(m.group(1), m.group(0)), text)
    text = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"\1", text)
    return html.unescape(text)


def indent(label: str, body: str) -> str:
    """`  label: body` for one line, else the label over the body's indented lines."""
    lines = body.splitlines() or [""]
    if len(lines) == 1:
        return f"  {label}: {lines[0]}"
    return f"  {label}:\n" + "\n".join(f"    {line}" for line in lines)
