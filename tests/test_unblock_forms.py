"""Unblock forms from where Buildkite really keeps them, end to end through the bot's HTTP port.

Buildkite's jobs never carry a block step's fields (nor does FakeBuildkite's): the bot reads
them from the pipeline's YAML or UI steps, then from the policy's `unblock_forms:`, and otherwise
asks for free-form `key=value` lines. Each test checks the modal Slack got and the PUT body
Buildkite got.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.unblock_forms import (
    BlockForm,
    FormError,
    form_in_pipeline,
    normalise_label,
    parse_fields,
    parse_freeform,
)
from app.ops.checks import check_policy
from app.simulators import slack_requests
from app.simulators.bot import SIGNING_SECRET, BotClient, bot_settings, running_bot
from app.simulators.buildkite import FakeBuildkite
from app.simulators.slack import FakeSlack, block_problems
from app.slack.payloads import UnblockMetadata
from app.slack.render.unblock import unblock_modal

CHANNEL = "C0CHAN"

RELEASE_FIELDS: list[dict[str, Any]] = [
    {
        "text": "Release name",
        "key": "release-name",
        "hint": "What's the code name? :name_badge:",
        "default": "Release #",
    },
    {
        "select": "Stream",
        "key": "release-stream",
        "required": False,
        "default": "beta",
        "options": [{"label": "Beta", "value": "beta"}, {"label": "Stable", "value": "stable"}],
    },
    {
        "select": "Regions",
        "key": "deploy-regions",
        "multiple": True,
        "default": ["na", "eur", "mars"],
        "options": [
            {"label": "North America", "value": "na"},
            {"label": "Europe", "value": "eur"},
            {"label": "Asia", "value": "asia"},
        ],
    },
]

UPLOADED_FIELDS: list[dict[str, Any]] = [{"text": "Release name", "key": "release-name"}]


@pytest.fixture
async def started(
    slack: FakeSlack, bk: FakeBuildkite, redis_url: str, redis_client: Any, tmp_path: Path
) -> AsyncIterator[Any]:
    """A function that starts the bot with a policy file (the pipelines are added first)."""
    bots: list[Any] = []

    async def start(policy: str = "{}\n") -> BotClient:
        path = tmp_path / "policy.yml"
        path.write_text(policy)
        manager = running_bot(slack, bk, redis_url, policy_file=str(path))
        bots.append(manager)
        return await manager.__aenter__()

    yield start
    for manager in reversed(bots):
        await manager.__aexit__(None, None, None)


async def open_unblock(
    bot: BotClient, pipeline: str, *, before_click: Any = None
) -> dict[str, Any]:
    """Deploy, block the build, click Unblock: the modal the bot opened."""

    def roots() -> list[Any]:
        return [c for c in bot.slack.posts(CHANNEL) if not c.args.get("thread_ts")]

    before = len(roots())
    await bot.command("/deploy", pipeline)
    await bot.slack.wait_for(lambda: len(roots()) > before)
    ts = str(roots()[-1].response["ts"])
    bot.bk.set_build_state(pipeline, 1, "passed", blocked=True)
    assert (await bot.webhook(bot.bk.webhook_payload(pipeline, 1))).status == 200
    unblock = await bot.slack.wait_for(lambda: _button(bot.slack, ts))
    assert unblock is not None
    if before_click is not None:
        before_click()
    opened_before = len(bot.slack.calls_to("views.open"))
    await bot.click("build_unblock", unblock["value"], channel=CHANNEL, message_ts=ts)
    opened = await bot.slack.wait_for(lambda: bot.slack.calls_to("views.open")[opened_before:])
    assert opened[0].response["ok"], opened[0].response
    view: dict[str, Any] = opened[0].args["view"]
    return view


def _button(slack: FakeSlack, ts: str) -> dict[str, Any] | None:
    for block in slack.message(CHANNEL, ts)["blocks"]:
        for element in block.get("elements", []):
            if element.get("action_id") == "build_unblock":
                return dict(element)
    return None


def inputs(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["block_id"]: b for b in view["blocks"] if b["type"] == "input"}


def text_of(view: dict[str, Any]) -> str:
    return json.dumps([b for b in view["blocks"] if b["type"] != "input"])


async def submit(bot: BotClient, view: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Submit the modal as Slack would, with each input's state; the bot's answer."""
    state: dict[str, dict[str, Any]] = {}
    for block_id, block in inputs(view).items():
        kind = block["element"]["type"]
        value = values.get(block_id)
        if kind == "plain_text_input":
            entry: dict[str, Any] = {"type": kind, "value": value}
        elif kind == "static_select":
            options = {o["value"]: o for o in block["element"]["options"]}
            entry = {"type": kind, "selected_option": options.get(value, {"value": value})}
            if value is None:
                entry["selected_option"] = None
        else:
            options = {o["value"]: o for o in block["element"]["options"]}
            entry = {"type": kind, "selected_options": [options[v] for v in value or []]}
        state[block_id] = {"value": entry}
    body, headers = slack_requests.view_submission(
        view["callback_id"],
        state,
        view["private_metadata"],
        view=view,
        signing_secret=SIGNING_SECRET,
    )
    async with bot.http.post(f"{bot.base}/slack/events", data=body, headers=headers) as resp:
        assert resp.status == 200
        raw = await resp.read()
    answer: dict[str, Any] = json.loads(raw) if raw else {}
    return answer


def unblock_puts(bk: FakeBuildkite) -> list[Any]:
    return [r for r in bk.requests_to("PUT") if r.path.endswith("/unblock")]


async def unblocked_reply(bot: BotClient) -> str:
    replies = await bot.slack.wait_for(
        lambda: [c.args["text"] for c in bot.slack.posts(CHANNEL) if "unblocked" in c.args["text"]]
    )
    return str(replies[0])


# -- from the pipeline's own steps --------------------------------------------------------------


async def test_a_form_from_the_pipeline_yaml_has_every_field_feature(
    started: Any, bk: FakeBuildkite
) -> None:
    bk.add_pipeline(
        "release",
        block="Request release",
        block_key="request-release",
        block_prompt="Fill out the details for release",
        block_fields=RELEASE_FIELDS,
    )
    bot = await started()
    view = await open_unblock(bot, "release")
    manual = next(j for j in bk.build("release", 1)["jobs"] if j["type"] == "manual")
    assert "fields" not in manual  # nothing came from the job
    assert "/v2/organizations/acme/pipelines/release" in [r.path for r in bk.requests_to("GET")]
    assert "Fill out the details for release" in text_of(view)
    assert "Fields from the pipeline's YAML" in text_of(view)
    name, stream, regions = (
        inputs(view)[f"field:{k}"] for k in ("release-name", "release-stream", "deploy-regions")
    )
    assert name["element"] == {
        "type": "plain_text_input",
        "action_id": "value",
        "initial_value": "Release #",
        "multiline": False,
    }
    assert name["hint"]["text"] == "What's the code name? :name_badge:"
    assert name["optional"] is False  # Buildkite's default: required
    assert stream["optional"] is True
    assert stream["element"]["type"] == "static_select"
    assert stream["element"]["initial_option"]["value"] == "beta"
    assert regions["element"]["type"] == "multi_static_select"
    # Only the defaults among the options: "mars" is not one of them.
    assert [o["value"] for o in regions["element"]["initial_options"]] == ["na", "eur"]
    assert [o["text"]["text"] for o in regions["element"]["options"]] == [
        "North America",
        "Europe",
        "Asia",
    ]

    answer = await submit(
        bot,
        view,
        {
            "field:release-name": "Flying Dolphin",
            "field:release-stream": None,
            "field:deploy-regions": ["na", "asia"],
        },
    )
    assert answer == {}
    (put,) = unblock_puts(bk)
    # A multiple select's choices go one a line, as Buildkite keeps them in the meta-data.
    assert put.json == {"fields": {"release-name": "Flying Dolphin", "deploy-regions": "na\nasia"}}
    assert manual["id"] in put.path
    assert bk.build("release", 1)["meta_data"]["deploy-regions"] == "na\nasia"
    reply = await unblocked_reply(bot)
    assert "*Request release*" in reply and "`na, asia`" in reply


async def test_a_form_from_the_steps_of_a_pipeline_defined_in_the_ui(
    started: Any, bk: FakeBuildkite
) -> None:
    fields = [{"text": "Reason", "key": "reason", "required": "false"}]
    bk.add_pipeline(
        "ui-steps", block="Approve", block_key="approve", block_fields=fields, block_in="steps"
    )
    assert bk.pipelines["ui-steps"]["configuration"] is None
    bot = await started()
    view = await open_unblock(bot, "ui-steps")
    assert "Fields from the pipeline's steps" in text_of(view)
    reason = inputs(view)["field:reason"]
    assert reason["optional"] is True and reason["label"]["text"] == "Reason"
    assert await submit(bot, view, {"field:reason": "hotfix"}) == {}
    assert unblock_puts(bk)[-1].json == {"fields": {"reason": "hotfix"}}


async def test_a_block_step_in_a_group_without_a_key_is_matched_by_its_label(
    started: Any, bk: FakeBuildkite
) -> None:
    fields = [
        {"select": "Target", "key": "target", "options": [{"label": "Prod", "value": "prod"}]}
    ]
    bk.add_pipeline("grouped", block=":rocket: Ship it", block_fields=fields, block_in="group")
    assert "group: Release" in bk.pipelines["grouped"]["configuration"]
    bot = await started()
    view = await open_unblock(bot, "grouped")
    manual = next(j for j in bk.build("grouped", 1)["jobs"] if j["type"] == "manual")
    assert manual["step_key"] is None
    assert ":rocket: Ship it" in text_of(view)
    target = inputs(view)["field:target"]
    assert (
        target["element"]["type"] == "static_select" and "initial_option" not in target["element"]
    )
    assert await submit(bot, view, {"field:target": "prod"}) == {}
    assert unblock_puts(bk)[-1].json == {"fields": {"target": "prod"}}


# -- from the policy's unblock_forms ----------------------------------------------------------


POLICY_FORMS = """\
unblock_forms:
  uploaded:
    release:                      # the step's label, matched without emoji and case
      prompt: Name this release
      fields:
        - text: Release name
          key: release-name
          hint: As in the changelog
        - select: Regions
          key: regions
          multiple: true
          required: false
          default: [eu]
          options:
            - {label: Europe, value: eu}
            - {label: US, value: us}
"""


async def test_a_form_from_the_policy_for_an_uploaded_step(started: Any, bk: FakeBuildkite) -> None:
    fields = [
        *UPLOADED_FIELDS,
        {
            "select": "Regions",
            "key": "regions",
            "multiple": True,
            "required": False,
            "options": [{"value": "eu"}, {"value": "us"}],
        },
    ]
    bk.add_pipeline("uploaded", block=":shipit: Release", block_fields=fields, block_in="upload")
    bot = await started(POLICY_FORMS)
    view = await open_unblock(bot, "uploaded")
    assert "Fields from the policy's unblock_forms" in text_of(view)
    assert "Name this release" in text_of(view)
    assert inputs(view)["field:release-name"]["hint"]["text"] == "As in the changelog"
    regions = inputs(view)["field:regions"]
    assert [o["value"] for o in regions["element"]["initial_options"]] == ["eu"]
    assert (
        await submit(bot, view, {"field:release-name": "v3", "field:regions": ["eu", "us"]}) == {}
    )
    assert unblock_puts(bk)[-1].json == {"fields": {"release-name": "v3", "regions": "eu\nus"}}


async def test_a_422_is_shown_next_to_the_input_of_its_field(
    started: Any, bk: FakeBuildkite
) -> None:
    # The policy says the field is optional; the step (uploaded) requires it, and Buildkite says so.
    policy = POLICY_FORMS.replace(
        "          hint: As in the changelog\n", "          required: false\n"
    )
    bk.add_pipeline("uploaded", block="Release", block_fields=UPLOADED_FIELDS, block_in="upload")
    bot = await started(policy)
    view = await open_unblock(bot, "uploaded")
    assert inputs(view)["field:release-name"]["optional"] is True
    answer = await submit(bot, view, {"field:regions": ["us"]})
    assert answer["response_action"] == "errors"
    assert answer["errors"] == {
        "field:release-name": "Buildkite says: missing field (a value is required)"
    }
    (put,) = unblock_puts(bk)
    assert put.json == {"fields": {"regions": "us"}}
    assert (
        next(j for j in bk.build("uploaded", 1)["jobs"] if j["type"] == "manual")["state"]
        == "blocked"
    )
    # Filled in, the same form unblocks.
    assert await submit(bot, view, {"field:release-name": "v3", "field:regions": ["us"]}) == {}
    assert unblock_puts(bk)[-1].json == {"fields": {"release-name": "v3", "regions": "us"}}


async def test_a_422_with_only_a_message_goes_to_the_field_it_names(
    started: Any, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("release", block="Request release", block_fields=RELEASE_FIELDS)
    bot = await started()
    view = await open_unblock(bot, "release")
    bk.fail_next(
        1, 422, "/unblock", method="PUT", body=json.dumps({"message": "Regions can't be blank"})
    )
    answer = await submit(bot, view, {"field:release-name": "v1", "field:deploy-regions": []})
    assert answer == {
        "response_action": "errors",
        "errors": {"field:deploy-regions": "Buildkite says: Regions can't be blank"},
    }


async def test_an_unexpected_failure_on_submit_is_answered_in_the_modal(
    started: Any, bk: FakeBuildkite, monkeypatch: pytest.MonkeyPatch
) -> None:
    bk.add_pipeline("release", block="Request release", block_fields=RELEASE_FIELDS)
    bot = await started()
    view = await open_unblock(bot, "release")

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("app.core.build_actions.BuildActions.unblock", broken)
    answer = await submit(bot, view, {"field:release-name": "v1", "field:deploy-regions": ["na"]})
    assert answer["response_action"] == "errors"
    (text,) = answer["errors"].values()
    assert text.startswith(":boom: Something went wrong on the bot's side (ref `")
    assert text.endswith("in the bot's logs.")  # whole, within a field error's 150 characters
    assert unblock_puts(bk) == []


async def test_check_config_names_a_bad_unblock_form_with_its_line(
    slack: FakeSlack, bk: FakeBuildkite, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(
        POLICY_FORMS.replace("key: release-name", "key: release name").replace(
            "default: [eu]", "default: [eu, mars]"
        )
        + "        - text: Notes\n          key: notes\n          colour: red\n"
    )
    check = check_policy(bot_settings(slack, bk, "redis://127.0.0.1:1/0", policy_file=str(path)))
    assert not check.ok
    problems = check.detail.splitlines()
    assert len(problems) == 3
    assert "line 6: unblock_forms.uploaded.release.fields.0:" in problems[0]
    assert "'release name' is not a field key" in problems[0]
    assert "line 9: unblock_forms.uploaded.release.fields.1:" in problems[1]
    assert "'mars' is not one of its options' values" in problems[1]
    assert "line 17: unblock_forms.uploaded.release.fields.2:" in problems[2]
    assert "unknown text field attribute(s): colour" in problems[2]


# -- the free-form fallback -----------------------------------------------------------------


async def test_an_unknown_step_gets_a_free_form_modal_with_the_build_link(
    started: Any, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("uploaded", block="Release", block_fields=UPLOADED_FIELDS, block_in="upload")
    bot = await started()
    view = await open_unblock(bot, "uploaded")
    assert "does not know this step's fields" in text_of(view)
    assert "<https://buildkite.com/acme/uploaded/builds/1|uploaded #1>" in text_of(view)
    (box,) = inputs(view).values()
    assert box["element"]["type"] == "plain_text_input" and box["element"]["multiline"] is True

    bad = await submit(bot, view, {box["block_id"]: "release-name=v1\nthis line has no equals"})
    assert bad == {
        "response_action": "errors",
        "errors": {box["block_id"]: "Line 2 is not key=value."},
    }
    bad = await submit(bot, view, {box["block_id"]: "release name=v1"})
    assert "Line 1: the key must be" in bad["errors"][box["block_id"]]
    assert unblock_puts(bk) == []

    # Buildkite's 422 for a field left out is shown on the one input there is.
    missing = await submit(bot, view, {box["block_id"]: "notes=hi"})
    assert missing["errors"] == {
        box["block_id"]: "Buildkite says: `release-name`: missing field (a value is required)"
    }
    answer = await submit(
        bot, view, {box["block_id"]: " release-name = Flying=Dolphin \n\nnotes=x"}
    )
    assert answer == {}
    assert [p.json for p in unblock_puts(bk)] == [
        {"fields": {"notes": "hi"}},
        {"fields": {"release-name": " Flying=Dolphin ", "notes": "x"}},
    ]


async def test_yaml_that_cannot_be_used_falls_back_to_free_form_saying_why(
    started: Any, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("tagged", block="Release")
    bk.add_pipeline("huge", block="Release")
    bk.add_pipeline("wide", block="Release")
    bk.pipelines["tagged"]["configuration"] = (
        "steps:\n  - block: Release\n    fields: !!python/object/apply:os.system [touch /tmp/x]\n"
    )
    bk.pipelines["huge"]["configuration"] = "steps:\n" + "  - command: x\n" * 30000
    options = [{"label": f"Option {n}", "value": f"o{n}"} for n in range(101)]
    bk.pipelines["wide"]["configuration"] = json.dumps(
        {
            "steps": [
                {
                    "block": "Release",
                    "fields": [{"select": "Pick", "key": "pick", "options": options}],
                }
            ]
        }
    )
    bot = await started()
    for slug, why in (
        ("tagged", "cannot be read (ConstructorError)"),
        ("huge", "is larger than 256 KiB"),
        ("wide", "select `pick` has 101 options; a Slack select holds at most 100"),
    ):
        view = await open_unblock(bot, slug)
        assert "does not know this step's fields" in text_of(view), slug
        assert why in text_of(view), (slug, text_of(view))


async def test_without_read_pipelines_the_policy_form_or_free_form_is_used(
    started: Any, bk: FakeBuildkite
) -> None:
    bk.add_pipeline("uploaded", block="Release", block_fields=UPLOADED_FIELDS)
    bk.add_pipeline("other", block="Release", block_fields=UPLOADED_FIELDS)
    bot = await started(POLICY_FORMS)

    def drop_scope() -> None:
        bk.scopes.remove("read_pipelines")

    view = await open_unblock(bot, "uploaded", before_click=drop_scope)
    assert "Fields from the policy's unblock_forms" in text_of(view)
    bk.scopes.append("read_pipelines")
    view = await open_unblock(bot, "other", before_click=drop_scope)
    assert "its token lacks the `read_pipelines` scope" in text_of(view)
    assert "does not know this step's fields" in text_of(view)


# -- the parts ------------------------------------------------------------------------------


def test_free_form_lines_are_parsed_strictly() -> None:
    assert parse_freeform("a=1\n\n b/c_d-e = two words\na=2\n") == {
        "a": "1\n2",
        "b/c_d-e": " two words",
    }
    for text, error in (
        ("=1", "Line 1: the key"),
        ("ok=1\nno", "Line 2 is not key=value."),
        ("k=\x1b[31m", "Line 1: the value has a control"),
        ("k\u202e=1", "Line 1: the key"),
    ):
        with pytest.raises(FormError, match=error.replace("[", r"\[")):
            parse_freeform(text)


def test_labels_compare_without_emoji_case_or_spaces() -> None:
    assert normalise_label(":rocket: Ship  It 🚀") == "ship it"
    assert normalise_label(":shipit: Release") == normalise_label("release")


def test_forms_are_cut_or_refused_at_slack_limits() -> None:
    long = [
        {"text": "L" * 2500, "key": "k", "hint": "h" * 2500, "default": "d" * 4000},
        {
            "select": "S",
            "key": "s",
            "default": "v",
            "options": [{"label": "o" * 100, "value": "v"}],
        },
    ]
    form = BlockForm(fields=parse_fields(long))
    meta = UnblockMetadata(pipeline="p", number=1, job="j", channel="C0CHAN")
    view = unblock_modal("x" * 500, form, meta)
    assert block_problems(view["blocks"], max_blocks=100) == []
    fields = inputs(view)
    assert len(fields["field:k"]["label"]["text"]) == 2000
    assert fields["field:s"]["element"]["initial_option"]["text"]["text"] == "o" * 74 + "…"
    # What cannot be cut without sending something else is refused, saying why.
    for raw, why in (
        ([{"text": "T", "key": f"k{n}"} for n in range(99)], "99 fields; a Slack modal holds"),
        (
            [{"select": "S", "key": "s", "options": [{"value": "v" * 151}]}],
            "longer than the 150 characters a Slack option can carry",
        ),
        ([{"text": "T", "key": "a b"}], "'a b' is not a field key"),
        ([{"text": "T", "key": "k"}, {"text": "U", "key": "k"}], "the key `k` is used by two"),
        ([{"select": "S", "key": "s"}], "select `s` needs `options:`"),
    ):
        with pytest.raises(FormError, match=why):
            parse_fields(raw)


def test_a_job_is_matched_to_its_step_by_key_then_label_and_never_by_guess() -> None:
    yaml_text = """
- input: "Who is running this?"
  fields: [{text: Your name, key: name}]
- block: Deploy
  key: deploy-eu
  fields: [{text: EU, key: eu}]
- block: Deploy
  key: deploy-us
  fields: [{text: US, key: us}]
- wait
- group: ":rocket: Ship"
  steps:
    - block: ":shipit: Approve"
      fields: [{text: Why, key: why}]
    - block: Twice
      fields: [{text: A, key: a}]
- block: Twice
  fields: [{text: B, key: b}]
"""

    def keys(step_key: str | None, label: str | None) -> list[str] | None:
        form, _ = form_in_pipeline(yaml_text, None, step_key=step_key, label=label)
        return None if form is None else [f.key for f in form.fields]

    assert keys(None, "Who is running this?") == ["name"]  # an input step, in a bare list
    assert keys("deploy-us", "Deploy") == ["us"]  # the key, not the first label
    assert keys(None, "Deploy") is None  # two steps labelled Deploy: no guess
    assert keys("deploy-ap", "Deploy") is None  # its key is neither of theirs
    assert keys(None, "approve") == ["why"]  # in a group, without emoji and case
    assert keys(None, "Twice") is None
    assert keys(None, "Nowhere") is None
    # The UI's steps (no YAML), in either shape.
    steps = [{"type": "manual", "label": "Go", "fields": [{"text": "X", "key": "x"}]}]
    form, problem = form_in_pipeline(None, steps, step_key=None, label="Go")
    assert form is not None and [f.key for f in form.fields] == ["x"] and problem is None
    # JSON is YAML too; "true"/"false" strings are Buildkite's booleans.
    as_json = json.dumps(
        {"steps": [{"block": "J", "fields": [{"text": "T", "key": "t", "required": "false"}]}]}
    )
    form, _ = form_in_pipeline(as_json, None, step_key=None, label="J")
    assert form is not None and form.fields[0].required is False
