"""`/deploy status` shows the freeze in force on each pipeline (its reason and its end as a
Slack date token), on the bot's own clock: signed slash commands in, the response JSON out."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.simulators.bot import FAST, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.clocks import Clock

BERLIN = "Europe/Berlin"


def at(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


#: Friday 27 March 2026, 14:00 UTC: an hour before the weekend freeze (16:00 CET).
BEFORE = at(2026, 3, 27, 14, 0)
#: Saturday, in the freeze; it ends Monday 30 March 08:00 CEST (06:00 UTC, after the DST change).
DURING = at(2026, 3, 28, 12, 0)
FREEZE_END = int(at(2026, 3, 30, 6, 0))

POLICY = f"""\
admins: [U0ADMIN]
pipelines:
  deploy-prod:
    deployers: [U0USER]
freezes:
  - pipelines: ["deploy-*"]
    weekly: "fri 16:00 - mon 08:00"
    timezone: {BERLIN}
    reason: weekend <freeze> & rest
"""


@pytest.fixture
def clock() -> Clock:
    return Clock(BEFORE)


@pytest.fixture
async def bot(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    clock: Clock,
    tmp_path: Path,
) -> AsyncIterator[BotClient]:
    for slug in ("deploy-prod", "web"):
        bk.add_pipeline(slug, default_branch="main", repository="git@github.com:acme/app.git")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    tuning = dataclasses.replace(FAST, clock=clock)
    async with running_bot(slack, bk, redis_url, tuning=tuning, policy_file=str(policy)) as b:
        yield b


async def answer(bot: BotClient, text: str) -> dict[str, Any]:
    _, name, _ = await bot.command("/deploy", text)
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return posts[-1].json


def shown(reply: dict[str, Any]) -> str:
    return "\n".join(str((b.get("text") or {}).get("text", "")) for b in reply.get("blocks") or [])


async def deployed(bot: BotClient, slug: str) -> None:
    reply = await answer(bot, f"{slug} main {'1' * 40}")
    assert "Started" in reply["text"], reply
    number = int(bot.bk.builds_of(slug)[-1]["number"])
    bot.bk.set_build_state(slug, number, "passed")
    assert (await bot.webhook(bot.bk.webhook_payload(slug, number))).status == 200
    await bot.settled()


async def test_status_shows_the_freeze_in_force_and_only_then(bot: BotClient, clock: Clock) -> None:
    await deployed(bot, "deploy-prod")
    await deployed(bot, "web")
    before = shown(await answer(bot, "status deploy-prod"))
    assert "live:" in before and ":snowflake:" not in before

    clock.now = DURING
    one = shown(await answer(bot, "status deploy-prod"))
    assert "• :snowflake: frozen: `weekend &lt;freeze&gt; &amp; rest`" in one
    assert "(weekly fri 16:00 - mon 08:00, Europe/Berlin)" in one
    # Its end as each reader's own time, falling back to Berlin's wall clock.
    assert (
        f"until <!date^{FREEZE_END}^{{date_short_pretty}} {{time}}|Mon 30 Mar 2026 08:00 CEST>"
        in one
    )
    assert "rollbacks and promotions are refused" in one
    assert "<freeze>" not in one  # policy text is text, never markup

    every = shown(await answer(bot, "status all"))
    lines = {line.split("`")[1]: line for line in every.splitlines() if line.startswith("• *`")}
    assert (
        f":snowflake: `weekend &lt;freeze&gt; &amp; rest` until <!date^{FREEZE_END}^"
        in lines["deploy-prod"]
    )
    assert ":snowflake:" not in lines["web"]

    clock.now = FREEZE_END
    assert ":snowflake:" not in shown(await answer(bot, "status deploy-prod"))


async def test_a_frozen_pipeline_with_nothing_deployed_still_shows_its_freeze(
    bot: BotClient, clock: Clock
) -> None:
    clock.now = DURING
    one = shown(await answer(bot, "status deploy-prod"))
    assert "nothing live" in one and ":snowflake: frozen: `weekend" in one
