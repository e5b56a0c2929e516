"""The Lua scripts of the store, read once from the package's `scripts/` directory."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

#: Prepended to every script that works on a build's record (its load/save/expire helpers).
RECORD_PRELUDE = "record"


@cache
def source(name: str) -> str:
    """The text of `scripts/{name}.lua` (shipped in the wheel as package data)."""
    return files(__package__).joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")


@cache
def record_script(name: str) -> str:
    """A script on a build's record: the shared helpers, then the script itself."""
    return source(RECORD_PRELUDE) + source(name)
