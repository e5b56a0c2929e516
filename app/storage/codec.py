"""How a build's record is laid out in Redis: short field names, compact JSON, times as integers.

A tracked build costs one string key, so every byte of its record counts (see
tests/test_store_footprint.py); the scripts in `scripts/` read and write the same short names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from app.storage.keys import BY_NUMBER_KEY
from app.storage.records import MessageTarget, TrackedBuild

#: Short names of the snapshot's fields in a record. Upper case, so that they cannot clash with a
#: field's own name (Buildkite's are snake_case); a field not listed keeps its name.
_SNAPSHOT_NAMES = {
    "id": "I",
    "number": "N",
    "state": "S",
    "blocked": "B",
    "web_url": "U",
    "message": "M",
    "commit": "C",
    "branch": "R",
    "source": "O",
    "author": "A",
    "creator": "K",
    "created_at": "Tc",
    "started_at": "Ts",
    "finished_at": "Tf",
}
_SNAPSHOT_FIELDS = {short: name for name, short in _SNAPSHOT_NAMES.items()}
_PEOPLE = {"author", "creator"}
_TIMES = ("created_at", "started_at", "finished_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Short names of a channel message's fields in a record (the channel is its key there).
_TARGET_NAMES = {
    "requester": "r",
    "thread_ts": "h",
    "ts": "t",
    "rendered": "d",
    "notify_url": "u",
    "route": "o",
}
#: The number index's key as a Lua `string.format` template (the scripts fill it in from a record).
BY_NUMBER_FORMAT = BY_NUMBER_KEY.format(pipeline="%s", number="%s")


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def encode_snapshot(build_id: str, snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The snapshot as kept in a record: short names, no None values, an `id` that is the build's
    own as "" (it is in the key already), no person's id (messages show names and emails), and
    times to the millisecond as milliseconds since the epoch."""
    out: dict[str, Any] = {}
    for name, value in snapshot.items():
        if value is None:
            continue
        if name in _PEOPLE and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if v is not None and k != "id"}
        elif name == "id" and value == build_id:
            value = ""
        elif name in _TIMES and isinstance(value, str):
            value = _milliseconds(value)
        out[_SNAPSHOT_NAMES.get(name, name)] = value
    return out


def _decode_snapshot(build_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
    snapshot = {_SNAPSHOT_FIELDS.get(short, short): value for short, value in data.items()}
    if snapshot.get("id") == "":
        snapshot["id"] = build_id
    for name in _TIMES:
        if isinstance(snapshot.get(name), int):
            moment = _EPOCH + timedelta(milliseconds=snapshot[name])
            snapshot[name] = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return snapshot


def _milliseconds(value: str) -> int | str:
    """An ISO time with a timezone and whole milliseconds as milliseconds since the epoch (13
    digits, exact in Lua's numbers); any other text as it is."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None or moment.microsecond % 1000:
        return value
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def encode_target(target: MessageTarget) -> dict[str, str]:
    fields = ((short, getattr(target, name)) for name, short in _TARGET_NAMES.items())
    return {short: value for short, value in fields if value}


def _decode_target(channel: str, data: Mapping[str, Any]) -> MessageTarget:
    fields = {name: data[short] for name, short in _TARGET_NAMES.items() if short in data}
    return MessageTarget(channel=channel, **fields)


def _mapping(value: Any) -> Mapping[str, Any]:
    """A JSON object of a record; an empty one may come back from Lua's cjson as []."""
    return value if isinstance(value, Mapping) else {}


def decode_record(build_id: str, raw: bytes | str) -> TrackedBuild:
    """A build's record as the store hands it out."""
    record = json.loads(raw)
    messages = _mapping(record.get("m"))
    return TrackedBuild(
        build_id=build_id,
        pipeline=record["p"],
        number=int(record["n"]),
        phase=record.get("ph", ""),
        gen=int(record.get("g") or 0),
        snapshot=_decode_snapshot(build_id, _mapping(record.get("s"))),
        retried=bool(record.get("rt")),
        targets=[_decode_target(c, _mapping(messages[c])) for c in sorted(messages)],
    )


def record_marks(raw: bytes | str | None) -> Mapping[str, Any]:
    """The posted/once markers of a build's stored record (none for a build not tracked)."""
    return _mapping(json.loads(raw).get("k")) if raw else {}


def new_record(pipeline: str, number: int) -> str:
    """The record of a build just tracked: no phase yet, no messages."""
    return compact_json({"p": pipeline, "n": number, "ph": "", "r": 0, "g": 0, "m": {}})


def text(value: Any) -> str:
    """A reply from Redis as text (the client is not made to decode replies)."""
    return value.decode() if isinstance(value, bytes) else str(value)
