"""People's text stays text, and a replayed click does nothing: the attacks of issue #13 §5 and
the button half of §6, played through the bot's real HTTP port.

Slack sends slash-command text with `&`, `<` and `>` escaped; a person who types
`<!channel>` sends `&lt;!channel&gt;`. Whatever the bot then posts must show that text, never a
live mention or link. A link built from Buildkite data goes only to Buildkite.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import redis.asyncio as redis

from app.simulators.bot import BotClient
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.slack import mrkdwn
from tests.test_deploy_loop import (
    BUILDS,
    CHANNEL,
    buttons,
    current,
    deploy,
    replies,
    roots,
    send_state,
)


def slack_json(slack: FakeSlack) -> str:
    """Every message the Slack fake received (Web API calls and response_url posts), as JSON."""
    return json.dumps(
        [c.args for c in slack.calls] + [p.json for p in slack.responses], ensure_ascii=False
    )


async def advance_redis_clock(client: redis.Redis, seconds: int) -> None:
    """Let `seconds` pass for every key with a TTL: the expired ones go, the others run shorter.

    A replay "35 s later" without waiting 35 s: the bot's own clock is not involved (Slack's
    signature window is five minutes, so the replayed signature still verifies).
    """
    async for key in client.scan_iter(match="*"):
        ttl = await client.ttl(key)
        if ttl < 0:
            continue
        if ttl <= seconds:
            await client.delete(key)
        else:
            await client.expire(key, ttl - seconds)


# -- §5: user text becomes Slack markup ---------------------------------------------------------


async def test_a_lock_reason_with_a_link_shows_as_text(bot: BotClient, slack: FakeSlack) -> None:
    text = "lock deploy-prod 2h freeze &lt;https://evil.example/login|Approve here&gt;"
    resp, name, _ack = await bot.command("/deploy", text)
    assert resp.status == 200
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert "&lt;https://evil.example/login|Approve here&gt;" in said
    assert "<https://evil.example" not in said
    assert "<https://evil.example" not in slack_json(slack)

    # The same reason, shown to someone who tries to deploy meanwhile and in /deploy locks.
    _, other, _ = await bot.command("/deploy", "deploy-prod", user_id="U0BOB")
    (refusal,) = await slack.wait_for(lambda: bot.response_texts(other))
    assert "locked by <@U0USER>" in refusal
    assert "&lt;https://evil.example/login|Approve here&gt;" in refusal
    _, listed, _ = await bot.command("/deploy", "locks")
    (locks,) = await slack.wait_for(lambda: bot.response_texts(listed))
    assert "&lt;https://evil.example/login|Approve here&gt;" in locks
    assert "<https://evil.example" not in slack_json(slack)


async def test_mentions_in_a_lock_reason_stay_text(bot: BotClient, slack: FakeSlack) -> None:
    text = "lock deploy-prod freeze &lt;!channel&gt; &lt;!here&gt; &lt;@U123&gt; &lt;#C999&gt; ```"
    _, name, _ = await bot.command("/deploy", text)
    (said,) = await slack.wait_for(lambda: bot.response_texts(name))
    assert "&lt;!channel&gt; &lt;!here&gt; &lt;@U123&gt; &lt;#C999&gt;" in said
    assert "```" not in said  # nor can it open a code block that swallows the rest
    everything = slack_json(slack)
    for live in ("<!channel>", "<!here>", "<@U123>", "<#C999>"):
        assert live not in everything


async def test_a_deploy_message_and_branch_from_slack_stay_text(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(
        bot, "deploy-prod main HEAD hi &lt;!channel&gt; &lt;https://evil.example|x&gt;"
    )
    (create,) = [r for r in bk.requests if r.method == "POST" and r.path == BUILDS]
    assert create.json["message"] == "hi <!channel> <https://evil.example|x>"  # as typed
    shown = json.dumps(current(slack, ts)["blocks"])
    assert "hi &lt;!channel&gt; &lt;https://evil.example|x&gt;" in shown
    assert "<!channel>" not in slack_json(slack)
    assert "<https://evil.example" not in slack_json(slack)


@pytest.mark.parametrize(
    "web_url",
    [
        "http://evil.example/acme/deploy-prod/builds/1",
        "https://evil.example/acme/deploy-prod/builds/1",
        "https://buildkite.com.evil.example/acme/deploy-prod/builds/1",
        "https://buildkite.com/acme/deploy-prod/builds/1|Approve>",
    ],
)
async def test_a_webhook_with_a_foreign_web_url_shows_no_link_to_it(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite, web_url: str
) -> None:
    ts = await deploy(bot)
    bk.build("deploy-prod", 1)["web_url"] = web_url
    bk.set_build_state("deploy-prod", 1, "failed", failed_jobs=["Test"])
    payload = bk.webhook_payload("deploy-prod", 1)
    payload["build"]["web_url"] = web_url
    resp = await bot.webhook(payload)
    assert resp.status in (200, 400)
    if resp.status == 200:
        await slack.wait_for(lambda: "Failed" in json.dumps(current(slack, ts)["blocks"]))
        await slack.wait_for(lambda: replies(slack, ts))
    everything = slack_json(slack)
    assert f"<{web_url}" not in everything
    assert "<http://evil" not in everything and "<https://evil" not in everything
    assert "<https://buildkite.com.evil" not in everything
    # The "Open in Buildkite" button is a link too: it goes, rather than point elsewhere.
    open_button = buttons(current(slack, ts)["blocks"]).get("build_open")
    assert open_button is None or open_button["url"] != web_url


def test_links_go_only_to_https_on_buildkites_host() -> None:
    assert mrkdwn.link("https://buildkite.com/acme/x/builds/1", "x #1") == (
        "<https://buildkite.com/acme/x/builds/1|x #1>"
    )
    assert mrkdwn.link("https://eu.buildkite.com/a", "a") == "<https://eu.buildkite.com/a|a>"
    for url in (
        "http://buildkite.com/a",
        "https://evil.example/a",
        "https://buildkite.com.evil.example/a",
        "https://evilbuildkite.com/a",
        "https://user:pw@buildkite.com/a",
        "https://buildkite.com:8443/a",
        "https://buildkite.com/a|b",
        "https://buildkite.com/a>b",
        "javascript:alert(1)",
        "",
        None,
    ):
        assert mrkdwn.link(url, "a <b> | c") == "a &lt;b&gt; ¦ c", url
    assert mrkdwn.code("a`b<@U1>") == "`a'b&lt;@U1&gt;`"
    assert mrkdwn.preformatted("```<!here>") == "`\u200b`\u200b`\u200b&lt;!here&gt;"


def test_the_configured_apis_web_host_is_trusted_only_over_https(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mrkdwn, "_extra_hosts", set())
    mrkdwn.trust_web_host("http://127.0.0.1:8080/v2")  # a local fake: nothing to link to
    assert mrkdwn.trusted_url("https://127.0.0.1/acme") is None
    mrkdwn.trust_web_host("https://api.bk.example.org/v2")
    assert mrkdwn.trusted_url("https://bk.example.org/acme/x/builds/1") is not None
    assert mrkdwn.trusted_url("http://bk.example.org/acme/x/builds/1") is None
    assert mrkdwn.trusted_url("https://example.org/acme") is None


# -- §6: a replayed click acts once ---------------------------------------------------------------


def _rebuild_click(bot: BotClient, slack: FakeSlack, ts: str, **fields: Any) -> tuple[bytes, Any]:
    from app.simulators import slack_requests
    from app.simulators.bot import SIGNING_SECRET

    value = buttons(current(slack, ts)["blocks"])["build_rebuild"]["value"]
    _, url = bot.new_response_url()
    return slack_requests.block_action(
        "build_rebuild",
        value,
        response_url=url,
        signing_secret=SIGNING_SECRET,
        channel_id=CHANNEL,
        message_ts=ts,
        **fields,
    )


def rebuilds(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests if r.method == "PUT" and r.path.endswith("/rebuild")]


@pytest.mark.parametrize("later", [35, 4 * 60])
async def test_a_replayed_rebuild_click_rebuilds_once(
    bot: BotClient,
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    later: int,
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "passed")
    await slack.wait_for(lambda: "build_rebuild" in buttons(current(slack, ts)["blocks"]))
    body, headers = _rebuild_click(bot, slack, ts)
    assert (await bot.post_slack(body, headers)).status == 200
    await slack.wait_for(lambda: len(roots(slack) + replies(slack, ts)) >= 2 and rebuilds(bk))

    await advance_redis_clock(redis_client, later)
    with caplog.at_level(logging.WARNING, logger="app.slack.clicks"):
        replay = await bot.post_slack(body, headers)  # the same signed bytes, again
    assert replay.status == 200
    # A deliberate new click (a new action_ts) on the same button still works.
    await bot.post_slack(*_rebuild_click(bot, slack, ts, action_ts="1.000001"))
    new_click = f"r{bot._responses}"
    await slack.wait_for(lambda: bot.response_texts(new_click))
    assert "Rebuild started" in bot.response_texts(new_click)[0]
    assert len(rebuilds(bk)) == 2
    assert len(bk.builds_of("deploy-prod")) == 3
    assert "dropped a replayed button click" in caplog.text


async def test_a_colleagues_separate_click_within_30_s_is_told_it_is_handled(
    bot: BotClient, slack: FakeSlack, bk: FakeBuildkite
) -> None:
    ts = await deploy(bot)
    await send_state(bot, "passed")
    await slack.wait_for(lambda: "build_rebuild" in buttons(current(slack, ts)["blocks"]))
    await bot.post_slack(*_rebuild_click(bot, slack, ts))
    await slack.wait_for(lambda: rebuilds(bk))
    body, headers = _rebuild_click(bot, slack, ts, user_id="U0BOB")
    await bot.post_slack(body, headers)
    name = f"r{bot._responses}"
    await slack.wait_for(lambda: bot.response_texts(name))
    assert "already asked" in bot.response_texts(name)[0]
    assert len(rebuilds(bk)) == 1


# -- what the fuzz test found --------------------------------------------------------------------


async def test_an_unblock_form_the_bot_did_not_write_is_answered_not_500(
    bot: BotClient, slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    from app.simulators import slack_requests
    from app.simulators.bot import SIGNING_SECRET

    body, headers = slack_requests.view_submission(
        "unblock_submit", {}, '{"channel": "C0CHAN"}', signing_secret=SIGNING_SECRET
    )
    async with bot.http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        answer = await resp.json()
    assert resp.status == 200
    assert answer["response_action"] == "update"
    assert "not valid any more" in json.dumps(answer["view"])
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text


async def test_a_webhook_with_an_impossible_pipeline_slug_is_not_announced(
    slack: FakeSlack,
    bk: FakeBuildkite,
    redis_url: str,
    redis_client: redis.Redis,
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app.simulators.bot import running_bot

    policy = tmp_path / "policy.yml"
    policy.write_text(f"notifications:\n  - pipelines: ['*']\n    channel: {CHANNEL}\n")
    bk.add_pipeline("web")
    bk.add_build("web", state="failed")
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as bot:
        payload = bk.webhook_payload("web", 1)
        payload["pipeline"]["slug"] = "<!channel> web"
        assert (await bot.webhook(payload)).status in (200, 400)
        good = bk.webhook_payload("web", 1)
        assert (await bot.webhook(good)).status == 200
        await slack.wait_for(lambda: roots(slack))
    assert len(roots(slack)) == 1  # only the real one
    assert "<!channel>" not in slack_json(slack)
    assert "transition of build" not in caplog.text and "Traceback" not in caplog.text
