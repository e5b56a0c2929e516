"""Where the promises of issues #13 and #14 met: attacks on the seams between their parts,
played through the bot's real HTTP port and checked on what reached the fakes.

- a write Buildkite may have done (a lost answer, a 5xx) is never sent again: unblock, cancel
  and retry are one PUT each, however slow Buildkite is;
- a replayed slash command or modal submission, signed and within Slack's five minutes, does
  nothing more than the first copy did;
- a lock stops everybody else's retries and unblocks too, not only deploys and rebuilds;
- a pipeline's YAML that PyYAML reads into a ValueError (a date that is no date, a huge int)
  falls back to the free-form form, like any other YAML the bot cannot use.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from tests.test_deploy_loop import CHANNEL, buttons, current, deploy, roots, send_state
from tests.test_hostile_text import advance_redis_clock
from tests.test_unblock_forms import inputs, open_unblock, text_of, unblock_puts

#: Buildkite answers within this, or the bot's client gives up (production: 15 s).
SHORT_TIMEOUT = {"buildkite_timeout": 0.5}


@pytest.fixture
async def started(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[Any]:
    """Start the bot with a policy file and settings (the pipelines are added first)."""
    bots: list[Any] = []

    async def start(policy: str = "{}\n", **settings: Any) -> BotClient:
        path = tmp_path / "policy.yml"
        path.write_text(policy)
        manager = running_bot(slack, bk, redis_url, policy_file=str(path), **settings)
        bots.append(manager)
        return await manager.__aenter__()

    yield start
    for manager in reversed(bots):
        await manager.__aexit__(None, None, None)


def puts_to(bk: FakeBuildkite, suffix: str) -> list[Any]:
    return [r for r in bk.requests_to("PUT") if r.path.endswith(suffix)]


async def blocked_build(bot: BotClient, pipeline: str) -> tuple[str, dict[str, Any]]:
    """Deploy `pipeline`, block its build: the build message's ts and its Unblock button."""
    before = len(roots(bot.slack))
    await bot.command("/deploy", pipeline)
    await bot.slack.wait_for(lambda: len(roots(bot.slack)) > before)
    ts = str(roots(bot.slack)[-1].response["ts"])
    bot.bk.set_build_state(pipeline, 1, "passed", blocked=True)
    assert (await bot.webhook(bot.bk.webhook_payload(pipeline, 1))).status == 200
    button = await bot.slack.wait_for(
        lambda: buttons(current(bot.slack, ts)["blocks"]).get("build_unblock")
    )
    assert button is not None
    return ts, button


# -- a write Buildkite may have done is sent once ---------------------------------------------


async def test_an_unblock_whose_answer_is_lost_is_not_sent_again(
    started: Any, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("release", block="Release")  # no fields: the click unblocks at once
    bot = await started(**SHORT_TIMEOUT)
    ts, button = await blocked_build(bot, "release")
    bk.drop_response_next(1, "/unblock", method="PUT", how="cut")
    _, name = await bot.click("build_unblock", button["value"], channel=CHANNEL, message_ts=ts)
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    # Buildkite unblocked it on the one PUT; a second would be refused ("isn't blocked").
    assert len(puts_to(bk, "/unblock")) == 1
    assert "isn't blocked" not in said and "refused" not in said
    assert "answer to unblock `release` #1 was lost, so it may have been done" in said
    manual = next(j for j in bk.build("release", 1)["jobs"] if j["type"] == "manual")
    assert manual["state"] == "unblocked"


async def test_a_cancel_whose_answer_is_lost_is_not_sent_again(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    await deploy(bot)
    bk.set_build_state("deploy-prod", 1, "running")
    bk.drop_response_next(1, "/cancel", method="PUT", how="cut")
    _, name, _ = await bot.command("/cancel", "deploy-prod 1")
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    # Canceled on the one PUT; a second is refused ("already finished").
    assert len(puts_to(bk, "/cancel")) == 1, said
    assert bk.build("deploy-prod", 1)["state"] == "canceled"
    assert "already finished" not in said
    assert "answer to cancel `deploy-prod` #1 was lost, so it may have been done" in said


async def test_a_retry_answered_502_after_it_happened_is_not_sent_again(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "failed", failed_jobs=["Test"])
    button = await slack.wait_for(
        lambda: buttons(current(slack, ts)["blocks"]).get("build_retry_failed")
    )
    assert button is not None
    bk.drop_response_next(1, "/retry_failed_jobs", method="PUT", how="fail")
    _, name = await bot.click("build_retry_failed", button["value"], channel=CHANNEL, message_ts=ts)
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert len(puts_to(bk, "/retry_failed_jobs")) == 1
    assert "was lost, so it may have been done; it was not sent again" in said


# -- replays within Slack's five minutes do nothing more ---------------------------------------


def rebuilds(bk: FakeBuildkite) -> list[Any]:
    return puts_to(bk, "/rebuild")


@pytest.mark.parametrize("command", ["/rebuild", "/cancel"])
async def test_a_replayed_slash_command_acts_once(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: redis.Redis, command: str
) -> None:
    await deploy(bot)
    if command == "/rebuild":
        await send_state(bot, "passed")
    else:
        bk.set_build_state("deploy-prod", 1, "running")
    name, url = bot.new_response_url()
    body, headers = slack_requests.slash_command(
        command, "deploy-prod 1", response_url=url, signing_secret=SIGNING_SECRET
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await slack.wait_for(lambda: bot.response_texts(name))
    sent = rebuilds(bk) if command == "/rebuild" else puts_to(bk, "/cancel")
    assert len(sent) == 1

    # The same signed bytes 35 s later: Slack's signature is still good for 4 more minutes.
    await advance_redis_clock(redis_client, 35)
    if command == "/cancel":
        bk.set_build_state("deploy-prod", 1, "running")  # a second cancel would go through
    assert (await bot.post_slack(body, headers)).status == 200
    await slack.wait_for(lambda: len(bot.response_texts(name)) >= 2)
    assert "You already asked for this" in bot.response_texts(name)[-1]
    assert len(rebuilds(bk) if command == "/rebuild" else puts_to(bk, "/cancel")) == 1
    assert len(bk.builds_of("deploy-prod")) == (2 if command == "/rebuild" else 1)


async def test_a_replayed_unblock_form_unblocks_once(
    started: Any,
    bk: FakeBuildkite,
    slack: FakeSlack,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bk.add_pipeline("release", block="Release", block_fields=[{"text": "Name", "key": "name"}])
    bot = await started()
    view = await open_unblock(bot, "release")
    (block_id,) = inputs(view)
    state = {block_id: {"value": {"type": "plain_text_input", "value": "v1"}}}
    body, headers = slack_requests.view_submission(
        view["callback_id"],
        state,
        view["private_metadata"],
        view=view,
        signing_secret=SIGNING_SECRET,
    )
    assert (await bot.post_slack(body, headers)).status == 200
    await slack.wait_for(lambda: unblock_puts(bk))
    # Meanwhile the build reaches another block step with the same job (as far as the signed
    # bytes go): a replay must not send what someone typed once a second time.
    await advance_redis_clock(redis_client, 35)
    manual = next(j for j in bk.build("release", 1)["jobs"] if j["type"] == "manual")
    manual["state"] = "blocked"
    with caplog.at_level(logging.WARNING, logger="app.slack.clicks"):
        assert (await bot.post_slack(body, headers)).status == 200
    assert "dropped a replayed modal submission" in caplog.text
    # A submission is answered once its unblock is done (or 2 s on): any PUT is in by now.
    assert [p.json for p in unblock_puts(bk)] == [{"fields": {"name": "v1"}}]


# -- a lock stops everybody else's retries and unblocks ----------------------------------------


async def test_a_lock_stops_retries_of_builds_its_holder_did_not_ask_for(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    ts = await deploy(bot)  # by U0USER
    await send_state(bot, "failed", failed_jobs=["Test"])
    button = await slack.wait_for(
        lambda: buttons(current(slack, ts)["blocks"]).get("build_retry_failed")
    )
    assert button is not None
    _, locked, _ = await bot.command("/deploy", "lock deploy-prod 2h freeze", user_id="U0CAROL")
    await slack.wait_for(lambda: bot.response_texts(locked))

    # Neither Bob nor the build's requester may re-run a deploy through Carol's freeze.
    for n, user in enumerate(("U0BOB", "U0USER")):
        _, name = await bot.click(
            "build_retry_failed",
            button["value"],
            channel=CHANNEL,
            message_ts=ts,
            user_id=user,
            action_ts=f"{n + 1}.0",
        )
        (said,) = await slack.wait_for(partial(bot.response_texts, name))
        assert "`deploy-prod` is locked by <@U0CAROL> (freeze)" in said, user
    assert puts_to(bk, "/retry_failed_jobs") == []

    # The holder may.
    _, name = await bot.click(
        "build_retry_failed", button["value"], channel=CHANNEL, message_ts=ts, user_id="U0CAROL"
    )
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert "Retrying" in said
    assert len(puts_to(bk, "/retry_failed_jobs")) == 1


async def test_a_lock_stops_unblocks_of_builds_its_holder_did_not_ask_for(
    started: Any, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    bk.add_pipeline("release", block="Release")
    bot = await started()
    ts, button = await blocked_build(bot, "release")  # by U0USER
    _, locked, _ = await bot.command("/deploy", "lock release 2h freeze", user_id="U0CAROL")
    await slack.wait_for(lambda: bot.response_texts(locked))

    _, name = await bot.click(
        "build_unblock", button["value"], channel=CHANNEL, message_ts=ts, user_id="U0BOB"
    )
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert "`release` is locked by <@U0CAROL> (freeze)" in said
    assert puts_to(bk, "/unblock") == []

    # The lock holder's own build may be helped along by others (as an approval may).
    _, unlocked, _ = await bot.command("/deploy", "unlock release", user_id="U0CAROL")
    await slack.wait_for(lambda: bot.response_texts(unlocked))
    _, locked, _ = await bot.command("/deploy", "lock release 2h mine", user_id="U0USER")
    await slack.wait_for(lambda: bot.response_texts(locked))
    _, name = await bot.click(
        "build_unblock",
        button["value"],
        channel=CHANNEL,
        message_ts=ts,
        user_id="U0BOB",
        action_ts="2.0",
    )
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert "Unblocked" in said
    assert len(puts_to(bk, "/unblock")) == 1


# -- a pipeline's YAML that PyYAML cannot turn into values ---------------------------------------


@pytest.mark.parametrize(
    "value",
    ["2021-13-01", "!!float not-a-number", "!!int 0x", "1" * 5000],
    ids=["no-such-date", "bad-float", "bad-int", "int-over-4300-digits"],
)
async def test_yaml_with_values_that_cannot_be_built_falls_back_to_free_form(
    started: Any, bk: FakeBuildkite, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    bk.add_pipeline("release", block="Release")
    bk.pipelines["release"]["configuration"] = (
        f"env:\n  WHEN: {value}\nsteps:\n  - block: Release\n    fields:\n"
        "      - text: Name\n        key: name\n"
    )
    bot = await started()
    with caplog.at_level(logging.WARNING):
        view = await open_unblock(bot, "release")
    assert "does not know this step's fields" in text_of(view)
    assert "cannot be read" in text_of(view)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    "steps",
    [
        "steps:\n  - command: make\n    when: 2021-13-01\n",
        "steps:\n  - command: " + "9" * 4400 + "\n",
        "steps: " + "[" * 2900,
    ],
    ids=["no-such-date", "int-over-4300-digits", "nested-2900-deep"],
)
async def test_steps_yaml_pasted_in_the_pipeline_form_that_cannot_be_built_is_named(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: Any,
    tmp_path: Path,
    bot_log: Any,
    steps: str,
) -> None:
    from tests.test_operator import ADMIN, POLICY, submit

    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as bot:
        await bot.command(
            "/buildkite",
            "pipeline create web https://github.com/acme/web.git",
            user_id=ADMIN,
            user_name="admin",
        )
        (opened,) = await slack.wait_for(lambda: slack.calls_to("views.open"))
        view = slack.views[opened.response["view"]["id"]]
        values = {"name": "web", "repository": "https://github.com/acme/web.git", "steps": steps}
        answer = await submit(bot, view, values)
    assert answer["response_action"] == "errors"
    assert "not valid YAML" in answer["errors"]["steps"]
    assert [r for r in bk.requests if r.method == "POST"] == []
    assert not [e for e in bot_log.entries() if e["level"] in ("error", "critical")]
    assert "Traceback" not in bot_log.text


async def test_a_lock_stops_auto_retries_of_builds_its_holder_did_not_ask_for(
    started: Any, bk: FakeBuildkite, slack: FakeSlack
) -> None:
    from tests.test_builds_e2e import thread

    bk.add_pipeline("flaky")
    bot = await started(
        "pipelines:\n  flaky:\n    auto_retry: {max_attempts: 1, hourly_budget: 5}\n"
    )

    async def deploy_flaky(user: str) -> str:
        before = len(roots(slack))
        await bot.command("/deploy", "flaky", user_id=user)
        await slack.wait_for(lambda: len(roots(slack)) > before)
        return str(roots(slack)[-1].response["ts"])

    async def fail(number: int) -> None:
        bk.set_build_state("flaky", number, "failed", failed_jobs=["Test"])
        assert (await bot.webhook(bk.webhook_payload("flaky", number))).status == 200

    first = await deploy_flaky("U0USER")  # before the freeze
    _, locked, _ = await bot.command("/deploy", "lock flaky 2h freeze", user_id="U0CAROL")
    await slack.wait_for(lambda: bot.response_texts(locked))

    # It fails during Carol's freeze: the bot does not re-run it on its own.
    await fail(1)
    (notice,) = await slack.wait_for(
        lambda: [t for t in thread(slack, first) if "Not auto-retried" in t]
    )
    assert "`flaky` is locked by <@U0CAROL> (freeze)" in notice
    assert puts_to(bk, "/retry_failed_jobs") == []

    # The holder's own build is retried as the policy says.
    second = await deploy_flaky("U0CAROL")
    await fail(2)
    await slack.wait_for(lambda: any("Auto-retried" in t for t in thread(slack, second)))
    assert [r.path.split("/builds/")[1] for r in puts_to(bk, "/retry_failed_jobs")] == [
        "2/retry_failed_jobs"
    ]
