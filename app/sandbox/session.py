"""One sandbox session: lines typed or scripted in, the bot's Slack messages printed with
numbered buttons, and the fake Buildkite's builds moved along by signed webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from app.sandbox.terminal import draw, indent, render_text

CHANNEL = "C0CHAN"
#: Seconds (at speed 1) at which a simulated build reaches each state.
PASSING = ((1.5, "running"), (4.0, "passed"))
FAILING = ((1.5, "running"), (3.0, "failing"), (5.0, "failed"))
FINAL = {"passed", "failed", "canceled", "skipped", "not_run"}
#: How long a line waits for the bot to finish once the builds rest.
BOT_SETTLE = 10.0
STEP_TIMEOUT = 60.0
HELP = (
    "Type a slash command (/deploy web main, /cancel web 1, /rebuild web 1, /deploy help), "
    "a button's number or label to press it, or quit."
)


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
        """Wait until the builds rest, the bot has finished what it was given, and neither they nor
        the bot changed anything for a while."""
        quiet = 0.5 + 1.5 / self.speed
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            self.flush()
            busy = any(b["state"] not in FINAL and not b["blocked"] for b in self.bk.builds)
            if not busy and time.monotonic() - self.last_activity > quiet:
                # The builds rest, but the bot may still be at work on the last line (a cold
                # first call is slow): wait for it too, and look again if it wrote anything.
                try:
                    await self.client.settled(
                        min(BOT_SETTLE, max(0.1, deadline - time.monotonic()))
                    )
                except AssertionError:
                    # Nothing in flight, but a transition waits for its retry (a Slack write
                    # failed): the bot will not change anything more soon, so go on.
                    self.flush()
                    return
                self.flush()
                if time.monotonic() - self.last_activity > quiet:
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
        return draw(content, self.slack, lambda element: self.button(element, channel, message))

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
