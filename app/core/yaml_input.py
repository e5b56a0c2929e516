"""YAML the bot did not write (a pipeline's steps, steps pasted in a form, the policy file), read
with PyYAML's safe loader and every way that can fail turned into one error.

PyYAML raises its own YAMLError for bad syntax, but lets through the ValueError of the Python
constructors it builds scalars with (a date that is no date, `!!int 0x`, an int of more than
4,300 digits) and a RecursionError for deep nesting.
"""

from __future__ import annotations

from typing import Any

import yaml


class UnreadableYAML(Exception):
    """The text cannot be read as YAML: `kind` names the failure, `line` (1-based) where."""

    def __init__(self, kind: str, line: int | None = None, *, too_deep: bool = False) -> None:
        self.kind = kind
        self.line = line
        self.too_deep = too_deep
        super().__init__(f"{kind}" + (f" at line {line}" if line else ""))


def load(text: str) -> Any:
    """`text` as data (safe loader: no tags run code); UnreadableYAML if it cannot be."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise UnreadableYAML(type(exc).__name__, mark.line + 1 if mark else None) from None
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        raise UnreadableYAML(type(exc).__name__) from None
    except RecursionError:
        raise UnreadableYAML("RecursionError", too_deep=True) from None
