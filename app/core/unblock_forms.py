"""Where a block step's unblock form comes from, and what a person may type into it.

Buildkite's API never returns a block step's `fields` on its job. They live in the pipeline's own
steps (its YAML `configuration`, or the `steps` of a pipeline defined in Buildkite's UI); steps
uploaded by an agent live only in the build, so the policy file may describe them
(`unblock_forms:`). When neither knows the step, the form is a free-form `key=value` list.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.core import yaml_input

log = logging.getLogger(__name__)

#: Buildkite's field keys: "alphanumeric characters, slashes, dashes, or underscores". The length
#: keeps `field:<key>` within Slack's 255-character block_id.
FIELD_KEY = re.compile(r"^[A-Za-z0-9/_-]{1,200}$")

#: What Slack's modal can hold (PLATFORM.md): 100 blocks (two are the step's title and the note),
#: 100 options a select, 150 characters an option value. Values cannot be cut short (the value
#: sent would differ), so a form beyond these is refused, saying why.
MAX_FIELDS = 98
MAX_OPTIONS = 100
MAX_OPTION_VALUE = 150

#: A pipeline YAML larger than this is not read (Buildkite's own limit is far below it).
MAX_CONFIGURATION_BYTES = 256 * 1024
#: Steps looked at in one pipeline, groups included: aliases can make a small document large.
MAX_STEPS = 2000

#: The free-form fallback: at most this many lines, each `key=value`.
MAX_FREEFORM_LINES = 100

_TEXT_KEYS = frozenset({"text", "key", "hint", "required", "default", "format"})
_SELECT_KEYS = frozenset({"select", "key", "hint", "required", "default", "multiple", "options"})
_OPTION_KEYS = frozenset({"label", "value", "hint", "required"})
_SHORTCODE = re.compile(r":[a-z0-9_+-]+:", re.IGNORECASE)


class FormError(ValueError):
    """A form (or one of its fields) cannot be read or shown; the message says which and why."""


@dataclass(frozen=True)
class Option:
    label: str
    value: str


@dataclass(frozen=True)
class FormField:
    """One field of a block step, in Buildkite's terms (`text` or `select`)."""

    kind: Literal["text", "select"]
    key: str
    label: str
    hint: str | None = None
    required: bool = True
    multiple: bool = False
    #: The default value (text), or the default options' values (select), as written.
    default: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()

    @property
    def initial_options(self) -> list[Option]:
        """The default options that are among the options (others are ignored, as Buildkite)."""
        chosen = [o for o in self.options if o.value in self.default]
        return chosen if self.multiple else chosen[:1]


@dataclass(frozen=True)
class BlockForm:
    """A block step's form: its prompt and fields, and where they were found."""

    fields: tuple[FormField, ...]
    prompt: str | None = None
    source: str = "the pipeline's steps"


# -- Buildkite's field syntax ------------------------------------------------------------------


def _flag(value: Any, name: str, default: bool) -> bool:
    # Buildkite's schema takes booleans and the strings "true" and "false".
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise FormError(f"`{name}` must be true or false, not {value!r}")


def _text(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise FormError(f"`{name}` must be a string, not {type(value).__name__}")
    return str(value)


def parse_field(raw: Any, *, strict: bool = False) -> FormField:
    """One field from Buildkite's syntax (`- text: ...` or `- select: ...`).

    `strict` (the policy file) also refuses unknown attributes and defaults that are not among
    the options; a pipeline's own YAML is read generously.
    """
    if not isinstance(raw, Mapping):
        raise FormError("a field must be a mapping with `text:` or `select:`")
    kind: Literal["text", "select"]
    if "select" in raw or "options" in raw:
        kind, allowed = "select", _SELECT_KEYS
    elif "text" in raw:
        kind, allowed = "text", _TEXT_KEYS
    else:
        raise FormError("a field needs `text:` or `select:` (its label)")
    if strict and (unknown := sorted(str(k) for k in raw if k not in allowed)):
        raise FormError(f"unknown {kind} field attribute(s): {', '.join(unknown)}")
    key = raw.get("key")
    if not isinstance(key, str) or not FIELD_KEY.match(key):
        raise FormError(
            f"`key` {key!r} is not a field key: 1 to 200 letters, digits, /, - or _"
            if key is not None
            else "a field needs a `key`"
        )
    label = raw.get(kind)
    label = key if label in (None, "") else _text(label, kind)
    hint = raw.get("hint")
    required = _flag(raw.get("required"), "required", True)
    if kind == "text":
        default = raw.get("default")
        return FormField(
            kind="text",
            key=key,
            label=label,
            hint=None if hint in (None, "") else _text(hint, "hint"),
            required=required,
            default=() if default in (None, "") else (_text(default, "default"),),
        )
    multiple = _flag(raw.get("multiple"), "multiple", False)
    options = _options(raw.get("options"), key)
    default = raw.get("default")
    defaults: tuple[str, ...]
    if default in (None, "", []):
        defaults = ()
    elif isinstance(default, list):
        if strict and not multiple:
            raise FormError(f"`{key}`: a list of defaults needs `multiple: true`")
        defaults = tuple(_text(d, "default") for d in default)
    else:
        defaults = (_text(default, "default"),)
    values = {o.value for o in options}
    if strict and (missing := [d for d in defaults if d not in values]):
        raise FormError(f"`{key}`: default {missing[0]!r} is not one of its options' values")
    return FormField(
        kind="select",
        key=key,
        label=label,
        hint=None if hint in (None, "") else _text(hint, "hint"),
        required=required,
        multiple=multiple,
        default=defaults,
        options=options,
    )


def _options(raw: Any, key: str) -> tuple[Option, ...]:
    if not isinstance(raw, list) or not raw:
        raise FormError(f"select `{key}` needs `options:`, a list of {{label, value}}")
    if len(raw) > MAX_OPTIONS:
        raise FormError(
            f"select `{key}` has {len(raw)} options; a Slack select holds at most {MAX_OPTIONS}"
        )
    options = []
    for n, item in enumerate(raw, 1):
        if not isinstance(item, Mapping) or item.get("value") in (None, ""):
            raise FormError(f"select `{key}`, option {n}: needs a `value`")
        value = _text(item["value"], "value")
        if len(value) > MAX_OPTION_VALUE:
            raise FormError(
                f"select `{key}`, option {n}: its value is longer than the {MAX_OPTION_VALUE} "
                "characters a Slack option can carry"
            )
        label = item.get("label")
        options.append(
            Option(label=value if label in (None, "") else _text(label, "label"), value=value)
        )
    if len({o.value for o in options}) != len(options):
        raise FormError(f"select `{key}` has two options with the same value")
    return tuple(options)


def parse_fields(raw: Any, *, strict: bool = False) -> tuple[FormField, ...]:
    """A step's `fields:` list, every field readable and each key once."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FormError("`fields` must be a list")
    if len(raw) > MAX_FIELDS:
        raise FormError(f"{len(raw)} fields; a Slack modal holds at most {MAX_FIELDS}")
    fields = []
    for n, item in enumerate(raw, 1):
        try:
            fields.append(parse_field(item, strict=strict))
        except FormError as exc:
            raise FormError(f"field {n}: {exc}") from None
    keys = [f.key for f in fields]
    if duplicate := next((k for k in keys if keys.count(k) > 1), None):
        raise FormError(f"the key `{duplicate}` is used by two fields")
    return tuple(fields)


# -- A pipeline's own steps --------------------------------------------------------------------


@dataclass(frozen=True)
class StepDef:
    """A block or input step as a pipeline defines it, fields not yet read."""

    label: str | None
    key: str | None
    fields: Any
    prompt: Any


def configuration_steps(text: str) -> list[Any]:
    """The steps of a pipeline's YAML `configuration` (`steps:` at the top, or a bare list).

    Read with PyYAML's safe loader (no tags run code); a document too large or too deeply nested
    is refused with FormError rather than read.
    """
    if len(text.encode("utf-8", "replace")) > MAX_CONFIGURATION_BYTES:
        raise FormError(f"the pipeline's YAML is larger than {MAX_CONFIGURATION_BYTES // 1024} KiB")
    try:
        data = yaml_input.load(text)
    except yaml_input.UnreadableYAML as exc:
        if exc.too_deep:
            raise FormError("the pipeline's YAML is nested too deeply") from None
        raise FormError(f"the pipeline's YAML cannot be read ({exc.kind})") from None
    if isinstance(data, Mapping):
        data = data.get("steps")
    return data if isinstance(data, list) else []


def block_steps(steps: Sequence[Any]) -> list[StepDef]:
    """Every block and input step, those inside groups included (groups do not nest)."""
    found: list[StepDef] = []
    for step in _walk(steps):
        if not isinstance(step, Mapping):
            continue  # "wait", "block" as a bare string: no key, no fields
        kind = step.get("type")
        if "block" in step or "input" in step or kind in ("block", "input", "manual"):
            label = next(
                (
                    str(step[name])
                    for name in ("block", "input", "label", "name")
                    if isinstance(step.get(name), str | int | float) and step.get(name) != ""
                ),
                None,
            )
            key = next(
                (
                    str(step[name])
                    for name in ("key", "identifier", "id", "step_key")
                    if isinstance(step.get(name), str) and step.get(name)
                ),
                None,
            )
            found.append(StepDef(label, key, step.get("fields"), step.get("prompt")))
    return found


def _walk(steps: Sequence[Any]) -> Iterator[Any]:
    seen = 0
    for step in steps:
        inner = step.get("steps") if isinstance(step, Mapping) else None
        is_group = isinstance(step, Mapping) and ("group" in step or step.get("type") == "group")
        for item in inner if is_group and isinstance(inner, list) else [step]:
            seen += 1
            if seen > MAX_STEPS:
                raise FormError(f"the pipeline has more than {MAX_STEPS} steps")
            yield item


def normalise_label(label: str) -> str:
    """A label without emoji (`:rocket:` shortcodes or characters), case or extra spaces."""
    text = _SHORTCODE.sub(" ", unicodedata.normalize("NFKC", label))
    text = "".join(c for c in text if unicodedata.category(c) != "So" and c not in "\ufe0f\u200d")
    return " ".join(text.split()).casefold()


def match_step(
    candidates: Sequence[tuple[str | None, str | None, Any]],
    *,
    step_key: str | None,
    label: str | None,
) -> Any:
    """The candidate (label, key, value) a job is: by step key, then label, then a loose label.

    A job with a step key never matches a candidate that has another key. Several candidates
    matching at the same stage is no match (the bot does not guess between two forms).
    """
    if step_key:
        by_key = [value for _, key, value in candidates if key == step_key]
        if by_key:
            return by_key[0] if len(by_key) == 1 else None
    usable = [(lbl, value) for lbl, key, value in candidates if not (step_key and key)]
    if not label:
        return None
    for same in (
        lambda c: c == label,
        lambda c: normalise_label(c) == normalise_label(label) != "",
    ):
        found = [value for lbl, value in usable if lbl is not None and same(lbl)]
        if len(found) == 1:
            return found[0]
        if found:
            return None
    return None


def form_in_steps(
    steps: Sequence[Any], *, step_key: str | None, label: str | None, source: str
) -> BlockForm | None:
    """The job's form among a pipeline's steps, or None when no single step is it."""
    defs = block_steps(steps)
    step = match_step([(d.label, d.key, d) for d in defs], step_key=step_key, label=label)
    if not isinstance(step, StepDef):
        return None
    prompt = step.prompt if isinstance(step.prompt, str) and step.prompt else None
    return BlockForm(fields=parse_fields(step.fields), prompt=prompt, source=source)


# -- The free-form fallback --------------------------------------------------------------------


def parse_freeform(text: str) -> dict[str, str]:
    """`key=value` lines into fields. A key given twice is one value of several lines, as
    Buildkite keeps a `multiple: true` select's choices. Blank lines are skipped.

    Raises FormError naming the first bad line.
    """
    fields: dict[str, str] = {}
    lines = text.replace("\r\n", "\n").split("\n")
    if len([line for line in lines if line.strip()]) > MAX_FREEFORM_LINES:
        raise FormError(f"At most {MAX_FREEFORM_LINES} lines.")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise FormError(f"Line {n} is not key=value.")
        if not FIELD_KEY.match(key):
            raise FormError(f"Line {n}: the key must be letters, digits, /, - or _ (at most 200).")
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
            raise FormError(f"Line {n}: the value has a control or invisible character.")
        fields[key] = f"{fields[key]}\n{value}" if key in fields else value
    return fields


def form_in_pipeline(
    configuration: str | None,
    steps: Sequence[Any] | None,
    *,
    step_key: str | None,
    label: str | None,
) -> tuple[BlockForm | None, str | None]:
    """The job's form in a pipeline's YAML, then in its UI-defined `steps`; and, when there is
    none that can be used, why (None: the step is simply not there, e.g. it was uploaded)."""
    problem = None
    sources: list[tuple[str, Any]] = []
    if configuration:
        sources.append(("the pipeline's YAML", configuration))
    if steps:
        sources.append(("the pipeline's steps", steps))
    for source, found in sources:
        try:
            listed = configuration_steps(found) if isinstance(found, str) else found
            form = form_in_steps(listed, step_key=step_key, label=label, source=source)
        except FormError as exc:
            log.warning("unblock form for %r: %s cannot be used: %s", label, source, exc)
            problem = f"its definition in {source} cannot be shown here: {exc}"
            continue
        if form is not None:
            return form, None
    return None, problem
