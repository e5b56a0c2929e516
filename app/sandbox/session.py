"""One sandbox session: lines typed or scripted in, the bot's Slack messages printed with
numbered buttons, and the fake Buildkite's builds moved along by signed webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from app.sandbox.people import AGENTS, PEOPLE, Person
from app.sandbox.terminal import draw, indent, render_text

__all__ = ["AGENTS", "HELP", "PEOPLE", "Person", "Session"]

CHANNEL = "C0CHAN"
#: Seconds (at speed 1) at which a simulated build reaches each state.
PASSING = ((1.5, "running"), (4.0, "passed"))
FAILING = ((1.5, "running"), (3.0, "failing"), (5.0, "failed"))
FINAL = {"passed", "failed", "canceled", "skipped", "not_run"}
#: How long a line waits for the bot to finish once the builds rest.
BOT_SETTLE = 10.0
STEP_TIMEOUT = 60.0
HELP = (
    "Type a slash command (/deploy web main, /cancel web 1, /rebuild web 1, /deploy help, "
    "/buildkite agents), a button's number or label to press it, `as bob` to speak as someone "
    "else, or quit."
)
_AS = re.compile(r"/?as(?:\s+(\S*))?\s*", re.IGNORECASE)
#: Where a thread's name ends in its parent's text: a build message's "web #1: …", or the end
#: of an approval's first sentence (a colon alone would cut inside a link's "https:").
_TITLE_END = re.compile(r": |\. ")
_TITLE_MAX = 80


def thread_title(text: str) -> str:
    """How the transcript names a thread: its parent message's first words."""
    title = _TITLE_END.split(text, maxsplit=1)[0].strip()
    return title if len(title) <= _TITLE_MAX else title[: _TITLE_MAX - 1].rstrip() + "…"


@dataclass
class Choice:
    """A button shown to the user, by the number printed next to it."""

    label: str
    action_id: str
    channel: str
    message: dict[str, Any]
    confirm: str | None
    value: str | None = None
    block_id: str = "actions"
    #: In a message only `owner` sees: Slack's click then carries no `message`.
    ephemeral: bool = False
    owner: str | None = None


class Session:
    """One sandbox session: lines typed in, what the bot did in Slack printed out."""

    def __init__(
        self,
        slack: Any,
        bk: Any,
        client: Any,
        out: TextIO,
        *,
        fail: bool,
        speed: float,
        person: Person = PEOPLE["alice"],
    ) -> None:
        self.slack, self.bk, self.client, self.out = slack, bk, client, out
        #: When (seconds at speed 1) a build reaches each state.
        self.timeline: tuple[tuple[float, str], ...] = FAILING if fail else PASSING
        self.speed = speed
        self.person = person
        #: Who acted through each response_url, so that its ephemeral answers are theirs.
        self.actors: dict[str, Person] = {}
        #: The message each click's response_url acts on: channel, ts, and whether ephemeral.
        self.targets: dict[str, tuple[str, str, bool]] = {}
        self.agent_states: dict[str, str] = {}
        self.waiting: set[str] = set()  # builds that wait for an agent
        self.choices: dict[int, Choice] = {}
        self.shown_calls = 0
        self.shown_responses = 0
        self.last_activity = time.monotonic()
        self.reader: asyncio.StreamReader | None = None  # stdin, when interactive
        self.prompting = False  # the prompt is shown, waiting for a line
        self.reprompt = False  # output broke into the prompt: show it again

    def say(self, text: str) -> None:
        if self.prompting:  # the bot spoke while you were typing: its lines go below the prompt
            self.out.write("\n")
            self.prompting, self.reprompt = False, True
        print(text, file=self.out, flush=True)

    @property
    def prompt(self) -> str:
        """Who is speaking: the lines typed next are theirs."""
        return f"{self.person.name}> "

    # -- input -----------------------------------------------------------------------------

    async def scripted(self, lines: list[str]) -> None:
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            self.say(f"{self.prompt}{line}")
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
            self.show_prompt()
            while line := (await reader.readline()).decode():
                self.prompting = self.reprompt = False  # the line typed ended the prompt's line
                if not await self.handle(line.strip()):
                    break
                self.show_prompt()
        finally:
            printer.cancel()
            transport.close()
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(sys.stdin.fileno(), True)

    def show_prompt(self) -> None:
        self.out.write(self.prompt)
        self.out.flush()
        self.prompting = True

    async def handle(self, line: str) -> bool:
        """Act on one line; False to stop."""
        if line in ("quit", "exit", "q"):
            return False
        self.last_activity = time.monotonic()  # the bot gets a moment to answer
        if switch := _AS.fullmatch(line):
            self.switch_to(switch.group(1) or "")
        elif line.startswith("/"):
            command, _, text = line.partition(" ")
            self.flush()
            resp, name, payload = await self.client.command(
                command, text.strip(), user_id=self.person.user_id, user_name=self.person.name
            )
            self.actors[name] = self.person
            if resp.status != 200:
                self.say(
                    f"  ✗ the bot answered HTTP {resp.status}: is {command} one of its commands?"
                )
            elif payload.get("text"):
                self.say(
                    indent(f"only {self.person.name}", render_text(payload["text"], self.slack))
                )
        elif line.isascii() and line.isdigit():
            choice = self.choices.get(int(line))
            if choice is None:
                self.say(f"  no button {line}")
            else:
                await self.press(choice)
        elif line and (choice := self.find_choice(line)) is not None:
            await self.press(choice)
        elif line:  # help, or anything else
            self.say(HELP)
        self.flush()
        return True

    def switch_to(self, name: str) -> None:
        """`as bob`: the lines that follow are bob's."""
        people = ", ".join(f"{p.name} ({p.about})" for p in PEOPLE.values())
        person = PEOPLE.get(name.lower())
        if person is None:
            if name:
                self.say(f"  nobody called {name!r} here; the sandbox has {people}")
            else:
                self.say(f"  as whom? The sandbox has {people}")
            return
        self.person = person
        self.say(f"  you are now @{person.name}, {person.about}")

    def find_choice(self, line: str) -> Choice | None:
        labelled = [n for n, c in self.choices.items() if c.label.lower() == line.lower()]
        return self.choices[max(labelled)] if labelled else None

    def still_shown(self, choice: Choice) -> bool:
        """Whether the button is still on its message as that message is now (a message that
        was edited, replaced or deleted since may no longer have it)."""
        store = self.slack.ephemeral_messages if choice.ephemeral else self.slack.messages
        current = store.get(choice.channel, {}).get(choice.message["ts"])
        if current is None:
            return False
        return any(
            element.get("action_id") == choice.action_id and element.get("value") == choice.value
            for block in current.get("blocks") or []
            if block.get("type") == "actions"
            for element in block.get("elements") or []
        )

    async def press(self, choice: Choice) -> None:
        if choice.ephemeral and choice.owner not in (None, self.person.user_id):
            owner = next((p.name for p in PEOPLE.values() if p.user_id == choice.owner), "?")
            self.say(f"  That {choice.label} button is in a message only @{owner} sees.")
            return
        if not self.still_shown(choice):
            self.say(f"  That {choice.label} button is no longer on its message.")
            return
        if choice.confirm:
            if self.reader is not None:
                self.say(f"  {choice.confirm} [y/N]")
                if not (await self.reader.readline()).decode().strip().lower().startswith("y"):
                    return
                if not self.still_shown(choice):  # it changed while you were asked
                    self.say(f"  That {choice.label} button is no longer on its message.")
                    return
            else:
                self.say(f"  (confirmed: {choice.confirm})")
        await self.click(choice)

    async def click(self, choice: Choice) -> None:
        """Slack's block_actions for the button, by the person speaking; its response_url edits
        the clicked message in the fake Slack, as Slack's does."""
        from app.simulators import slack_requests
        from app.simulators.bot import SIGNING_SECRET

        ts = str(choice.message["ts"])
        name, url = self.client.new_response_url(channel=choice.channel, message_ts=ts)
        self.actors[name] = self.person
        self.targets[name] = (choice.channel, ts, choice.ephemeral)
        store = self.slack.ephemeral_messages if choice.ephemeral else self.slack.messages
        current = store.get(choice.channel, {}).get(ts) or choice.message
        where: dict[str, Any] = (
            {"message_ts": ts, "message_blocks": current.get("blocks") or [], "ephemeral": True}
            if choice.ephemeral
            else {"message": {k: v for k, v in current.items() if k != "is_ephemeral"}}
        )
        body, headers = slack_requests.block_action(
            choice.action_id,
            choice.value,
            response_url=url,
            signing_secret=SIGNING_SECRET,
            channel_id=choice.channel,
            block_id=choice.block_id,
            user_id=self.person.user_id,
            user_name=self.person.name,
            **where,
        )
        await self.client.post_slack(body, headers)

    # -- output ----------------------------------------------------------------------------

    async def keep_printing(self) -> None:
        """While you type: print what the bot does as it does it, then the prompt again."""
        while True:
            self.flush()
            if self.reprompt:
                self.reprompt = False
                self.show_prompt()
            await asyncio.sleep(0.1)

    async def settle(self) -> None:
        """Wait until the builds rest, the bot has finished what it was given, and neither they nor
        the bot changed anything for a while."""
        quiet = 0.5 + 1.5 / self.speed
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            self.flush()
            busy = any(
                b["state"] not in FINAL and not b["blocked"] and b["id"] not in self.waiting
                for b in self.bk.builds
            )
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
        ts = str(call.response.get("message_ts") or call.response.get("ts") or call.args.get("ts"))
        thread = call.args.get("thread_ts")
        if call.method == "chat.postEphemeral":
            owner = str(call.args.get("user", ""))
            stored = self.slack.ephemeral_messages.get(channel, {}).get(ts)
            message = {"ts": ts, **(stored or call.args), "is_ephemeral": True, "owner": owner}
            name = str(self.slack.users.get(owner, {}).get("name", owner))
            return indent(f"only {name}", self.render(call.args, channel, message))
        message = self.slack.messages.get(channel, {}).get(ts) or {"ts": ts, **call.args}
        if call.method == "chat.update":
            label = f"{where}, message edited"
        elif thread:
            parent = self.slack.messages.get(channel, {}).get(thread, {})
            title = thread_title(render_text(str(parent.get("text", "")), self.slack))
            label = f"{where}, thread of {title}"
            label += " (also sent to the channel)" if call.args.get("reply_broadcast") else ""
        else:
            label = f"{where}, new message"
        return indent(label, self.render(call.args, channel, message))

    def show_response(self, post: Any) -> str | None:
        body = post.json
        if body.get("delete_original"):
            return "  (the bot deleted the message you clicked)"
        actor = self.actors.get(post.name, self.person)
        in_channel = body.get("response_type") == "in_channel"
        label = "#deploys" if in_channel else f"only {actor.name}"
        text, blocks = str(body.get("text", "")), list(body.get("blocks") or [])
        replacing = body.get("replace_original")
        if replacing:
            label += " (replacing the message you clicked)"
        # A click's response_url edited the clicked message in the fake Slack: draw it as it is.
        message = self.replaced(post.name) if replacing else None
        if message is None and in_channel:
            message = {"ts": self.slack.add_message(CHANNEL, text, blocks=blocks), **body}
        elif message is None:  # an ephemeral message, with the ts Slack would give it
            ts = self.slack.add_ephemeral(CHANNEL, actor.user_id, text, blocks=blocks)
            message = {"ts": ts, **body, "is_ephemeral": True, "owner": actor.user_id}
        return indent(label, self.render(body, CHANNEL, message))

    def replaced(self, response_name: str) -> dict[str, Any] | None:
        """The message a click's response_url replaced, as the fake Slack now keeps it."""
        if response_name not in self.targets:
            return None
        channel, ts, ephemeral = self.targets[response_name]
        store = self.slack.ephemeral_messages if ephemeral else self.slack.messages
        message = store.get(channel, {}).get(ts)
        if message is None:
            return None
        if ephemeral:
            return {**message, "is_ephemeral": True, "owner": message.get("user")}
        return dict(message)

    def render(self, content: dict[str, Any], channel: str, message: dict[str, Any]) -> str:
        return draw(
            content,
            self.slack,
            lambda element, block: self.button(element, block, channel, message),
        )

    def button(
        self, element: dict[str, Any], block: dict[str, Any], channel: str, message: dict[str, Any]
    ) -> str:
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
            value=element.get("value"),
            block_id=str(block.get("block_id") or "actions"),
            ephemeral=bool(message.get("is_ephemeral")),
            owner=message.get("owner"),
        )
        return f"[{number}] {label}"

    # -- Buildkite moving builds along -----------------------------------------------------

    async def simulate_builds(self) -> None:
        """Move every unfinished build along the timeline on the fake's agents, with a signed
        webhook whenever a build changed (by the timeline, or by Buildkite itself: a build
        canceled because its agent was force-stopped)."""
        born: dict[str, float] = {}
        sent: dict[str, tuple[str, bool]] = {}
        url = f"{self.client.base}/buildkite/webhook"
        while True:
            for build in list(self.bk.builds):
                if build["state"] not in FINAL and not build["blocked"]:
                    self.advance(build, born)
                seen = (build["state"], build["blocked"])
                if sent.setdefault(build["id"], seen) != seen:
                    sent[build["id"]] = seen
                    payload = self.bk.webhook_payload(build["pipeline"]["slug"], build["number"])
                    with contextlib.suppress(OSError):
                        await self.bk.send_webhook(url, payload, mode="signature")
                    self.last_activity = time.monotonic()
            self.report_agents()
            await asyncio.sleep(0.05)

    def advance(self, build: dict[str, Any], born: dict[str, float]) -> None:
        """Move one build along the timeline; a scheduled build first waits for an agent."""
        slug, number = build["pipeline"]["slug"], build["number"]
        if build["state"] == "scheduled" and not self.bk.idle_agents():
            if build["id"] not in self.waiting:
                self.waiting.add(build["id"])
                self.say(f"  (Buildkite: {slug} #{number} waits: no agent is connected and idle)")
            born.pop(build["id"], None)
            return
        self.waiting.discard(build["id"])
        age = time.monotonic() - born.setdefault(build["id"], time.monotonic())
        due = [reached for at, reached in self.timeline if age * self.speed >= at]
        if not due:
            return
        state = build["state"]
        if state in due:  # one step at a time: a late tick must not skip "running"
            state = due[min(due.index(state) + 1, len(due) - 1)]
        else:
            state = due[0] if state == "scheduled" else due[-1]
        if state != build["state"]:
            failed = ["Test"] if state in ("failing", "failed") else []
            self.bk.set_build_state(slug, number, state, failed_jobs=failed)

    def report_agents(self) -> None:
        """Say when an agent starts or finishes stopping: what Stop did on Buildkite."""
        for agent in self.bk.agents.values():
            state = agent["connection_state"]
            if self.agent_states.setdefault(agent["id"], state) == state:
                continue
            self.agent_states[agent["id"]] = state
            self.last_activity = time.monotonic()
            if state == "stopping":
                self.say(f"  (Buildkite: agent {agent['name']} is stopping after its job)")
            else:
                self.say(f"  (Buildkite: agent {agent['name']} is {state})")
