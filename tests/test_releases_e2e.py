"""The release ledger end to end: signed slash commands and webhooks in, create-build bodies,
Slack JSON and ledger entries in Redis out. Status, history, rollback (with its approval), and
promotion refused and allowed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.ledger_rebuild import rebuild_ledger
from app.core.policy import PolicyError, load_policy
from app.simulators.bot import BotClient, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack
from app.storage import keys
from tests.test_policy_e2e import value_of

CHANNEL = "C0CHAN"
ALICE, BOB = "U0USER", "U0BOB"
BUILDS = "/organizations/acme/pipelines/{}/builds"
ROLLBACK_USAGE = "Usage: `/deploy rollback <pipeline> [to #N] [--break-glass <reason>]`"
PROMOTE_USAGE = "Usage: `/deploy promote <pipeline> [--break-glass <reason>]`"
SHA1, SHA2, SHA3, SHA4 = ("1" * 40, "2" * 40, "3" * 40, "4" * 40)

POLICY = """\
admins: [U0ADMIN]
pipelines:
  deploy-prod:
    protected: true
    approval:
      approvers: [U0BOB]
    promote_from: staging-deploy
  prod-lite:
    promote_from: staging-deploy
notifications:
  - pipelines: ["ext-deploy"]
    channel: C0CHAN
    events: [passed, failed]
    deploy: true
  - pipelines: ["ci"]
    channel: C0CHAN
    events: [passed, failed]
"""


@pytest.fixture
async def bot(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[BotClient]:
    slack.add_user(BOB, "bob", "bob@example.com")
    for slug in ("deploy-prod", "prod-lite", "staging-deploy", "web", "ext-deploy", "ci"):
        bk.add_pipeline(slug, repository="git@github.com:acme/app.git")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    async with running_bot(slack, bk, redis_url, policy_file=str(policy)) as client:
        yield client


async def answer(bot: BotClient, text: str, **kwargs: Any) -> dict[str, Any]:
    _, name, ack = await bot.command("/deploy", text, **kwargs)
    if ack.get("text") and "Usage" in str(ack.get("text")):
        return ack
    posts = await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name])
    return posts[-1].json


async def finish(bot: BotClient, slug: str, number: int, state: str = "passed") -> None:
    """Buildkite ends the build and says so in a webhook."""
    bot.bk.set_build_state(slug, number, state)
    response = await bot.webhook(bot.bk.webhook_payload(slug, number))
    assert response.status == 200
    await bot.settled()


async def deployed(bot: BotClient, slug: str, commit: str, state: str = "passed") -> int:
    """A /deploy of `commit` on main, started and ended; returns its build number."""
    reply = await answer(bot, f"{slug} main {commit}")
    assert "Started" in reply["text"], reply
    number = int(bot.bk.builds_of(slug)[-1]["number"])
    await finish(bot, slug, number, state)
    return number


async def entry(redis_client: Any, slug: str, number: int) -> dict[str, Any]:
    raw = await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline=slug, number=number))
    assert raw is not None, f"{slug} #{number} is not in the ledger"
    return dict(json.loads(raw))


def shown(reply: dict[str, Any]) -> str:
    return "\n".join(
        str((b.get("text") or {}).get("text", "")) for b in reply.get("blocks") or []
    ) or str(reply.get("text"))


# -- the ledger ------------------------------------------------------------------------------


async def test_a_deploy_is_recorded_running_then_final_once(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    reply = await answer(bot, f"web main {SHA1}")
    assert "Started" in reply["text"]
    running = await entry(redis_client, "web", 1)
    assert running["o"] == "running" and running["r"] == ALICE and running["c"] == SHA1
    assert "f" not in running

    await finish(bot, "web", 1)
    final = await entry(redis_client, "web", 1)
    assert final["o"] == "passed" and final["r"] == ALICE and final["b"] == "main"
    assert final["u"] == "acme" and final["f"] >= final["t"]  # the usual web URL: its org
    raw = await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline="web", number=1))

    # The same final again (a replayed webhook, a poll, another replica) changes nothing.
    await bot.webhook(bk.webhook_payload("web", 1))
    await bot.services.tracker.observe(await _fetched(bot, "web", 1))
    await bot.settled()
    assert await redis_client.get(keys.DEPLOYMENT_KEY.format(pipeline="web", number=1)) == raw
    assert await redis_client.zrange(keys.LEDGER_KEY.format(pipeline="web"), 0, -1) == [b"1"]
    ttl = await redis_client.ttl(keys.DEPLOYMENT_KEY.format(pipeline="web", number=1))
    assert keys.LEDGER_KEEP - 120 < ttl <= keys.LEDGER_KEEP


async def _fetched(bot: BotClient, slug: str, number: int) -> Any:
    return await bot.services.buildkite.get_build(slug, number)


async def test_builds_of_a_deploy_route_are_deployments_and_others_are_not(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    bk.add_build("ext-deploy", commit=SHA2, state="passed")
    bk.add_build("ci", commit=SHA2, state="passed")
    for slug in ("ext-deploy", "ci"):
        assert (await bot.webhook(bk.webhook_payload(slug, 1))).status == 200
    await bot.settled()
    announced = await entry(redis_client, "ext-deploy", 1)
    assert announced["s"] == "route" and announced["o"] == "passed" and "r" not in announced
    assert await redis_client.exists(keys.DEPLOYMENT_KEY.format(pipeline="ci", number=1)) == 0
    status = shown(await answer(bot, "status ext-deploy"))
    assert f"`{SHA2[:12]}`" in status and "announced" in status


# -- who asked: the bot's record, or the build's meta_data's word -----------------------------


async def test_a_requester_only_the_builds_meta_data_names_is_shown_as_its_word(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    # Any job of a build can set its meta_data: a deploy route's build naming Bob did not
    # come through the bot, which cannot vouch for it.
    bk.add_build("ext-deploy", commit=SHA2, state="passed", meta_data={"chatops_requested_by": BOB})
    assert (await bot.webhook(bk.webhook_payload("ext-deploy", 1))).status == 200
    await bot.settled()
    announced = await entry(redis_client, "ext-deploy", 1)
    assert announced["r"] == BOB and announced["rm"] is True
    status = shown(await answer(bot, "status ext-deploy"))
    assert "by <@U0BOB> (per build meta_data)," in status
    history = shown(await answer(bot, "history ext-deploy"))
    assert "by <@U0BOB> (per build meta_data)" in history

    # A ledger rebuilt from Buildkite knows who asked only from the meta_data too; a deploy
    # the bot started itself is its own record.
    bk.add_build("web", commit=SHA1, state="passed", meta_data=bot_meta(BOB))
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    await deployed(bot, "web", SHA2)
    lines = [line for line in shown(await answer(bot, "history web")).splitlines() if "#" in line]
    assert "by <@U0USER>" in lines[0] and "meta_data" not in lines[0]
    assert "by <@U0BOB> (per build meta_data)" in lines[1]
    assert "rm" not in await entry(redis_client, "web", 2)


async def test_the_bots_record_of_who_asked_beats_what_the_meta_data_says(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    # Alice rebuilds from Slack a build of a deploy route's pipeline whose meta_data (copied
    # to the rebuild by Buildkite) names Bob: the bot knows Alice asked.
    bk.add_build("ext-deploy", commit=SHA1, state="passed", meta_data=bot_meta(BOB))
    _, name, _ = await bot.command("/rebuild", "ext-deploy 1")
    assert "Started" in (await bot.slack.wait_for(lambda: bot.response_texts(name)))[-1]
    await finish(bot, "ext-deploy", 2)
    rebuilt = await entry(redis_client, "ext-deploy", 2)
    assert rebuilt["r"] == ALICE and "rm" not in rebuilt
    history = shown(await answer(bot, "history ext-deploy"))
    assert "by <@U0USER>" in history and "meta_data" not in history


def bot_meta(user: str) -> dict[str, str]:
    return {"chatops_source": "slack", "chatops_requested_by": user}


# -- status and history ----------------------------------------------------------------------


async def test_status_and_history(bot: BotClient, bk: FakeBuildkite) -> None:
    await deployed(bot, "web", SHA1)
    await deployed(bot, "web", SHA2, state="failed")
    reply = await answer(bot, f"web main {SHA3}")  # still running
    assert "Started" in reply["text"]

    status = shown(await answer(bot, "status web"))
    assert f"live: `{SHA1[:12]}` (`main`) in <https://buildkite.com/acme/web/builds/1|#1>" in status
    assert "by <@U0USER>" in status
    compare = f"<https://github.com/acme/app/compare/{SHA1[:12]}...main|commits on main since>"
    assert compare in status
    assert f"deploying now: `{SHA3[:12]}`" in status

    history = shown(await answer(bot, "history web 2"))
    assert "Last 2 deployments of `web`" in history
    lines = [line for line in history.splitlines() if "builds/" in line]
    assert "builds/3|#3>" in lines[0] and "running" in lines[0]
    assert "builds/2|#2>" in lines[1] and "failed in" in lines[1] and "<@U0USER>" in lines[1]


async def test_status_all_asks_buildkite_nothing(bot: BotClient, bk: FakeBuildkite) -> None:
    await deployed(bot, "web", SHA1)
    await deployed(bot, "staging-deploy", SHA2)
    await answer(bot, "lock web 1h release")
    before = len(bk.requests)
    reply = await answer(bot, "status all")
    assert len(bk.requests) == before
    text = shown(reply)
    assert "What is live* on 2 pipelines" in text
    assert text.index("`staging-deploy`") < text.index("`web`")
    assert f"`{SHA1[:12]}` <https://buildkite.com/acme/web/builds/1|#1> by <@U0USER>" in text
    assert text.splitlines()[-1].endswith(":lock: <@U0USER>")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("history", "Usage: `/deploy history <pipeline> [n]`"),
        ("history web 0", "`0` is not a number of deployments"),
        ("history web 51", "`51` is not a number of deployments"),
        ("history Web", "is not a pipeline slug"),
        ("status web extra", "Usage: `/deploy status [pipeline|all]`"),
        ("rollback", ROLLBACK_USAGE),
        ("rollback web to", ROLLBACK_USAGE),
        ("rollback web to #x", "`#x` is not a build number"),
        ("promote", PROMOTE_USAGE),
        ("promote a b", PROMOTE_USAGE),
    ],
)
async def test_bad_release_commands_get_their_usage(
    bot: BotClient, bk: FakeBuildkite, text: str, expected: str
) -> None:
    _, _, ack = await bot.command("/deploy", text)
    assert expected in ack["text"]
    assert [r for r in bk.requests if r.method == "POST"] == []


# -- rollback ----------------------------------------------------------------------------------


async def test_rollback_deploys_the_previous_passed_commit(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    await deployed(bot, "web", SHA1)
    await deployed(bot, "web", SHA2, state="failed")
    await deployed(bot, "web", SHA3)

    _, name, ack = await bot.command("/deploy", "rollback web")
    assert ack["text"] == ":hourglass_flowing_sand: Looking up what was deployed on `web`…"
    reply = (await bot.slack.wait_for(lambda: [p for p in bot.slack.responses if p.name == name]))[
        -1
    ].json
    assert f"from `{SHA3[:12]}` (#3) to `{SHA1[:12]}` (#1)" in reply["text"]
    assert f"https://github.com/acme/app/compare/{SHA3}...{SHA1}" in reply["text"]
    create = bk.requests_to("POST", BUILDS.format("web"))[-1]
    assert create.json["commit"] == SHA1 and create.json["branch"] == "main"
    assert create.json["meta_data"]["chatops_rollback_of"] == "3"
    assert create.json["meta_data"]["chatops_requested_by"] == ALICE
    await finish(bot, "web", 4)
    rolled = await entry(redis_client, "web", 4)
    assert rolled["rb"] == 3 and rolled["o"] == "passed" and rolled["c"] == SHA1
    assert "a rollback of #3" in shown(await answer(bot, "status web"))

    # Build #N: only a passed deployment of that pipeline.
    refused = (await answer(bot, "rollback web to #2"))["text"]
    assert "#2 of `web` failed: only a passed deployment can be rolled back to" in refused
    assert "#99 is not a deployment of `web`" in (await answer(bot, "rollback web to 99"))["text"]
    assert "#4 is what is live" in (await answer(bot, "rollback web to #4"))["text"]
    again = await answer(bot, "rollback web to #3")
    assert f"to `{SHA3[:12]}` (#3)" in again["text"]
    assert bk.requests_to("POST", BUILDS.format("web"))[-1].json["commit"] == SHA3
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 5


async def test_rollback_with_nothing_to_go_back_to_is_refused(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    empty = (await answer(bot, "rollback web"))["text"]
    assert "`web` has no passed deployment in the ledger" in empty
    await deployed(bot, "web", SHA1)
    await deployed(bot, "web", SHA1)
    only = (await answer(bot, "rollback web"))["text"]
    assert "Nothing to roll back to: #2 is the only passed deployment" in only
    assert "Nothing was started" in only
    assert len(bk.requests_to("POST", BUILDS.format("web"))) == 2


async def test_a_rollback_of_a_protected_pipeline_is_confirmed_and_approved(
    bot: BotClient, bk: FakeBuildkite, slack: FakeSlack, redis_client: Any
) -> None:
    # deploy-prod's history, as Buildkite has it: the bot's builds, found by a ledger rebuild.
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    for sha in (SHA1, SHA2):
        bk.add_build("deploy-prod", commit=sha, state="passed", meta_data=meta, env={"A": "1"})
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)

    reply = await answer(bot, "rollback deploy-prod")
    text = shown(reply)
    assert "`deploy-prod` is protected" in text
    assert f"*Rollback of:* #2, from `{SHA2[:12]}` to `{SHA1[:12]}`" in text
    assert f"https://github.com/acme/app/compare/{SHA2}...{SHA1}" in text
    assert bk.requests_to("POST") == []
    confirm = value_of(reply["blocks"], "deploy_confirm")
    _, name = await bot.click(
        "deploy_confirm", confirm, channel=CHANNEL, message_ts="1.1", ephemeral=True
    )
    await slack.wait_for(lambda: bot.response_texts(name))
    post = await slack.wait_for(
        lambda: [c for c in slack.posts(CHANNEL) if "asks to roll back" in c.args["text"]]
    )
    ts = post[0].response["ts"]
    assert "*Rollback of:* #2" in json.dumps(slack.message(CHANNEL, ts)["blocks"])
    approve = value_of(slack.message(CHANNEL, ts)["blocks"], "approval_approve")
    _, ok = await bot.click(
        "approval_approve", approve, channel=CHANNEL, message_ts=ts, user_id=BOB
    )
    assert "Started" in (await slack.wait_for(lambda: bot.response_texts(ok)))[0]
    (create,) = bk.requests_to("POST", BUILDS.format("deploy-prod"))
    assert create.json["commit"] == SHA1 and create.json["env"] == {"A": "1"}
    assert create.json["meta_data"]["chatops_rollback_of"] == "2"
    assert create.json["meta_data"]["chatops_approved_by"] == BOB
    await finish(bot, "deploy-prod", 3)
    rolled = await entry(redis_client, "deploy-prod", 3)
    assert rolled["rb"] == 2 and rolled["a"] == BOB and rolled["r"] == ALICE
    assert "am" not in rolled  # the approver is the bot's own record: its create's answer
    history = shown(await answer(bot, "history deploy-prod"))
    (line,) = [x for x in history.splitlines() if "/builds/3|" in x]
    assert f"approved by <@{BOB}>" in line, line
    assert f"approved by <@{BOB}> (per build meta_data)" not in line


async def test_an_approver_known_only_from_meta_data_is_marked_as_its_word(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    """A rebuilt ledger (or a route's build) has only the build's meta_data for who approved,
    which any of its jobs can write: history says so, as it does for who asked."""
    meta = {"chatops_source": "slack", "chatops_requested_by": BOB, "chatops_approved_by": ALICE}
    bk.add_build("web", commit=SHA1, state="passed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    assert (await entry(redis_client, "web", 1))["am"] is True
    history = shown(await answer(bot, "history web"))
    assert f"approved by <@{ALICE}> (per build meta_data)" in history


# -- promotion ---------------------------------------------------------------------------------


async def test_a_commit_that_did_not_pass_staging_is_refused(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    await deployed(bot, "staging-deploy", SHA1)
    await deployed(bot, "staging-deploy", SHA2, state="failed")
    refused = (await answer(bot, f"prod-lite main {SHA2}"))["text"]
    assert "`prod-lite` takes only commits that passed a deployment of `staging-deploy`" in refused
    assert f"`{SHA2}` has not" in refused
    assert "`/deploy history staging-deploy`" in refused
    assert "<https://buildkite.com/acme/staging-deploy/builds|the builds of staging-deploy>" in (
        refused
    )
    assert bk.requests_to("POST", BUILDS.format("prod-lite")) == []
    # A full SHA the ledger lacks is looked for on Buildkite once, by commit and state.
    (looked,) = [
        r
        for r in bk.requests_to("GET", BUILDS.format("staging-deploy"))
        if r.param("commit") == SHA2
    ]
    assert looked.params("state[]") == ["passed"]


async def test_a_commit_that_passed_staging_is_deployed_and_promote_takes_the_live_one(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    await deployed(bot, "staging-deploy", SHA1)
    reply = await answer(bot, f"prod-lite main {SHA1[:8]}")  # a short SHA, resolved
    assert "Started" in reply["text"]
    create = bk.requests_to("POST", BUILDS.format("prod-lite"))[-1]
    assert create.json["commit"] == SHA1
    assert create.json["meta_data"]["chatops_promoted_from"] == "staging-deploy#1"

    # HEAD is resolved to the branch's newest build's commit, and built as that SHA.
    await deployed(bot, "staging-deploy", SHA2)
    bk.add_build("prod-lite", commit=SHA2, branch="main", state="canceled")
    assert "Started" in (await answer(bot, "prod-lite"))["text"]
    assert bk.requests_to("POST", BUILDS.format("prod-lite"))[-1].json["commit"] == SHA2

    promoted = (await answer(bot, "promote prod-lite"))["text"]
    assert f"Promoting `{SHA2[:12]}` from `staging-deploy` #2 to `prod-lite`" in promoted
    create = bk.requests_to("POST", BUILDS.format("prod-lite"))[-1]
    assert create.json["commit"] == SHA2 and create.json["branch"] == "main"
    assert create.json["meta_data"]["chatops_promoted_from"] == "staging-deploy#2"
    number = int(bk.builds_of("prod-lite")[-1]["number"])
    await finish(bot, "prod-lite", number)
    assert (await entry(redis_client, "prod-lite", number))["pf"] == "staging-deploy#2"
    assert "promoted from `staging-deploy#2`" in shown(await answer(bot, "history prod-lite"))


async def test_promote_without_a_rule_or_anything_live_is_refused(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    assert "`web` has no `promote_from`" in (await answer(bot, "promote web"))["text"]
    nothing = (await answer(bot, "promote prod-lite"))["text"]
    assert "Nothing is live on `staging-deploy`" in nothing
    assert bk.requests_to("POST") == []


async def test_a_rollback_is_not_held_to_promote_from(bot: BotClient, bk: FakeBuildkite) -> None:
    await deployed(bot, "staging-deploy", SHA1)
    await deployed(bot, "staging-deploy", SHA2)
    await deployed(bot, "prod-lite", SHA1)
    await deployed(bot, "prod-lite", SHA2)
    await answer(bot, "lock staging-deploy")  # irrelevant to prod-lite's rollback
    reply = await answer(bot, "rollback prod-lite")
    assert "Rolling back `prod-lite`" in reply["text"]
    create = bk.requests_to("POST", BUILDS.format("prod-lite"))[-1]
    assert create.json["commit"] == SHA1 and "chatops_promoted_from" not in create.json["meta_data"]


async def test_a_rebuild_on_a_promote_from_pipeline_is_held_to_it(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    await deployed(bot, "staging-deploy", SHA1)
    bk.add_build("prod-lite", commit=SHA4, state="failed")  # started outside the bot
    bk.add_build("prod-lite", commit=SHA1, state="failed")
    _, name, _ = await bot.command("/rebuild", "prod-lite 1")
    refused = (await bot.slack.wait_for(lambda: bot.response_texts(name)))[-1]
    assert f"`{SHA4}` has not" in refused
    assert bk.requests_to("PUT") == []
    _, name, _ = await bot.command("/rebuild", "prod-lite 2")
    started = (await bot.slack.wait_for(lambda: bot.response_texts(name)))[-1]
    assert "Started" in started
    (rebuild,) = bk.requests_to("PUT")
    assert rebuild.path.endswith("/prod-lite/builds/2/rebuild")


async def test_a_buildkite_rebuild_of_a_deployment_is_one_credited_to_who_rebuilt_it(
    bot: BotClient, bk: FakeBuildkite, redis_client: Any
) -> None:
    meta = {"chatops_source": "slack", "chatops_requested_by": BOB, "chatops_approved_by": ALICE}
    bk.add_build("web", commit=SHA1, state="passed", meta_data=meta)
    _, name, _ = await bot.command("/rebuild", "web 1")
    assert "Started" in (await bot.slack.wait_for(lambda: bot.response_texts(name)))[-1]
    await finish(bot, "web", 2)
    rebuilt = await entry(redis_client, "web", 2)
    assert rebuilt["r"] == ALICE and "a" not in rebuilt and rebuilt["o"] == "passed"


async def test_status_finds_the_live_deployment_behind_many_failures(
    bot: BotClient, bk: FakeBuildkite
) -> None:
    meta = {"chatops_source": "slack", "chatops_requested_by": ALICE}
    bk.add_build("web", commit=SHA1, state="passed", meta_data=meta)
    for _ in range(25):
        bk.add_build("web", commit=SHA2, state="failed", meta_data=meta)
    services = bot.services
    await rebuild_ledger(services.store, services.buildkite, services.policy)
    before = len(bk.requests)
    text = shown(await answer(bot, "status"))
    assert f"live: `{SHA1[:12]}` (`main`) in <https://buildkite.com/acme/web/builds/1|#1>" in text
    assert len(bk.requests) == before


def test_promote_from_must_name_a_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "policy.yml"
    path.write_text("pipelines:\n  prod:\n    promote_from: ../staging\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(str(path))
    assert "'../staging' is not a pipeline slug" in str(caught.value)
    path.write_text("notifications:\n  - pipelines: [x]\n    channel: C0CHAN\n    deploy: maybe\n")
    with pytest.raises(PolicyError):
        load_policy(str(path))


async def test_hostile_words_are_quoted_back_as_text(bot: BotClient, bk: FakeBuildkite) -> None:
    # As Slack sends what people type: `<` and `>` escaped, a mention or link wrapped.
    for text in (
        "history &lt;!channel&gt;",
        "status <@U0BOB>",
        "rollback web to #&lt;!here&gt;",
        "history web &lt;@U0BOB&gt;",
    ):
        _, _, ack = await bot.command("/deploy", text)
        assert "<!" not in ack["text"] and "<@" not in ack["text"], ack["text"]
    assert bk.requests_to("POST") == []


def test_the_policy_examples_of_docs_releases_are_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "releases.md").read_text()
    examples = [part.split("```", 1)[0] for part in doc.split("```yaml\n")[1:]]
    assert len(examples) == 2
    for index, example in enumerate(examples):
        path = tmp_path / f"policy{index}.yml"
        path.write_text(example)
        policy = load_policy(str(path))
        assert policy.data.notifications or policy.data.pipelines
    assert policy.rule_for("deploy-prod").promote_from == "staging-deploy"
