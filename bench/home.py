"""Item 6: App Home freshness. One build followed by 100 people (each asked for it in their own
channel, each has opened their Home); the time from its state change (a signed webhook) to the
last of their 100 Homes showing it, and the views.publish calls that cost, once for one change
and once for a burst of three changes within the debounce window.

The bot runs in this process against the fakes (as the tests run it), with production's 5 s
debounce and no Slack pacing. The baseline of the time is the same 100 views.publish calls made
back to back by a bare client (the floor of any bot that publishes each Home once); the baseline
of the calls is one per person and change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import redis.asyncio as redis
from slack_sdk.web.async_client import AsyncWebClient

from app.simulators import slack_requests
from app.simulators.bot import FAST, SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.tuning import InboxTuning
from buildkite.models import Build


async def _wait(predicate: Any, what: str, timeout: float = 60.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def _publishes(slack: FakeSlack, since: int) -> int:
    return sum(1 for c in slack.calls[since:] if c.method == "views.publish" and c.ok)


def _all_show(slack: FakeSlack, users: list[str], text: str) -> bool:
    return all(text in json.dumps(slack.home_views.get(u, {}).get("blocks")) for u in users)


async def _open_homes(bot: BotClient, users: list[str]) -> None:
    for user in users:
        event = {"type": "app_home_opened", "user": user, "channel": "D" + user[1:], "tab": "home"}
        body, headers = slack_requests.event_callback(event, signing_secret=SIGNING_SECRET)
        await bot.post_slack(body, headers)
    await _wait(lambda: all(u in bot.slack.home_views for u in users), "every Home opened")


async def _bare_publishes(slack: FakeSlack, users: list[str], view: dict[str, Any]) -> float:
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    started = time.perf_counter()
    for user in users:
        await client.views_publish(user_id=user, view=view)
    return time.perf_counter() - started


async def run(url: str, *, people: int = 100) -> dict[str, Any]:
    await redis.Redis.from_url(url).flushdb()
    users = [f"U{n:07d}" for n in range(people)]
    tuning = dataclasses.replace(FAST, inbox=InboxTuning(home_debounce=5.0))
    async with FakeSlack() as slack, FakeBuildkite() as bk:
        for n, user in enumerate(users):
            slack.add_user(user, f"person{n}", f"person{n}@example.com")
        bk.add_pipeline("web")
        async with running_bot(slack, bk, url, tuning=tuning) as bot:
            bk.add_build("web", state="scheduled")
            build = Build.model_validate(bk.build("web", 1))
            for n, user in enumerate(users):
                await bot.services.tracker.track(
                    build, pipeline="web", channel=f"C{n:07d}", requester=user
                )
            await bot.settled()
            await _open_homes(bot, users)
            await asyncio.sleep(5.1)  # the windows the opening claimed pass
            await bot.settled()

            before = len(slack.calls)
            bk.set_build_state("web", 1, "running")
            started = time.perf_counter()
            await bot.webhook(bk.webhook_payload("web", 1))
            await _wait(lambda: _all_show(slack, users, "Running"), "every Home to show Running")
            one_change = time.perf_counter() - started
            one_change_calls = _publishes(slack, before)
            calls = slack.calls[before:]
            first = min(c.time for c in calls)
            last_write = max(c.time for c in calls if c.method.startswith("chat."))
            first_publish = min(c.time for c in calls if c.method == "views.publish")
            last_publish = max(c.time for c in calls if c.method == "views.publish")
            split = {
                "messages_s": last_write - first,
                "first_publish_after_s": first_publish - first,
                "publishes_s": last_publish - first_publish,
            }

            await asyncio.sleep(5.1)
            before = len(slack.calls)
            started = time.perf_counter()
            for state in ("failing", "failed"):
                bk.set_build_state("web", 1, state, failed_jobs=["Test"])
                await bot.webhook(bk.webhook_payload("web", 1))
            bk.set_build_state("web", 1, "failed", failed_jobs=["Test"])
            await _wait(lambda: _all_show(slack, users, "Failed"), "every Home to show Failed")
            burst = time.perf_counter() - started
            assert bot.services.inbox is not None
            await bot.services.inbox.settled()
            burst_calls = _publishes(slack, before)
            bare = await _bare_publishes(slack, users, slack.home_views[users[0]])
        problems = slack.unexpected + bk.unexpected
    return {
        "people": people,
        "one_change_s": one_change,
        "one_change_calls": one_change_calls,
        "split": split,
        "burst_s": burst,
        "burst_calls": burst_calls,
        "bare_s": bare,
        "unexpected": problems,
    }
