"""The one parser of button values and modal metadata: the model back, or the one UserError."""

from __future__ import annotations

import pytest

from app.core.errors import UserError
from app.slack.payloads import (
    STALE_BUTTON,
    BuildButtonValue,
    UnblockMetadata,
    action_value,
    view_metadata,
)


def click(value: object) -> dict[str, object]:
    return {"actions": [{"action_id": "build_rebuild", "value": value}]}


def test_a_value_the_bot_wrote_is_read_back() -> None:
    written = BuildButtonValue(pipeline="web", number=12)
    assert action_value(click(written.model_dump_json()), BuildButtonValue) == written


@pytest.mark.parametrize(
    "body",
    [
        click('{"pipeline": "web", "number": 12, "extra": 1}'),  # not a shape the bot writes
        click('{"pipeline": "../admin", "number": 12}'),
        click('{"pipeline": "web", "number": 0}'),
        click("not json"),
        click(None),
        {"actions": []},
        {},
    ],
)
def test_anything_else_is_the_one_stale_button_error(body: dict[str, object]) -> None:
    with pytest.raises(UserError) as raised:
        action_value(body, BuildButtonValue)
    assert raised.value.text == STALE_BUTTON


def test_modal_metadata_is_read_back_or_none() -> None:
    meta = UnblockMetadata(pipeline="web", number=3, job="j-1", channel="C0CHAN")
    view = {"private_metadata": meta.model_dump_json(exclude_none=True)}
    assert view_metadata(view, UnblockMetadata) == meta
    assert view_metadata({"private_metadata": '{"pipeline": "web"}'}, UnblockMetadata) is None
    assert view_metadata({}, UnblockMetadata) is None
