"""The documentation stays true: its links resolve, every setting is on the configuration page,
and the README's install and test commands are the ones CI and the Dockerfile run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"

#: Pages that other work in flight adds: a link to one of them may dangle until it lands.
#: The integrator empties this set once they are all merged.
PENDING_PAGES: frozenset[str] = frozenset()

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def documents() -> list[Path]:
    """Every page the test keeps true: the README, docs/ and the benchmarks' README."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def prose(text: str) -> str:
    """The text outside fenced code blocks and code spans, where a link is a link."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, without punctuation, spaces as -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in it counts as its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown page's headings; a repeated one gets -1, -2… as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for match in _HEADING.finditer(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return _LINK.findall(prose(path.read_text(encoding="utf-8")))


def broken_links(path: Path, pending: frozenset[str] = PENDING_PAGES) -> list[str]:
    """Each relative link of `path` (and its #anchor) that does not resolve, with why."""
    problems = []
    for target in links(path):
        if _SCHEME.match(target):
            continue  # https:, mailto:: not ours to check offline
        where, _, anchor = target.partition("#")
        resolved = (path.parent / where).resolve() if where else path
        try:
            relative = resolved.relative_to(ROOT).as_posix()
        except ValueError:
            problems.append(f"{target}: outside the repository")
            continue
        if not resolved.exists():
            if relative.rstrip("/") not in pending:
                problems.append(f"{target}: no such file ({relative})")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {relative}")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    assert broken_links(path) == []


def test_the_index_lists_every_page() -> None:
    index = ROOT / "docs" / "README.md"
    listed = {(index.parent / link.partition("#")[0]).resolve() for link in links(index)}
    pages = set((ROOT / "docs").glob("*.md")) - {index}
    unlisted = sorted(page.name for page in pages if page.resolve() not in listed)
    assert not unlisted, f"add a line for each of these to docs/README.md: {unlisted}"
    assert len(links(README)) > 20  # the reader finds the rest through the README's links


def test_the_link_check_catches_a_dangling_page_or_anchor(tmp_path: Path) -> None:
    page = ROOT / "docs" / "_probe_of_test_docs.md"
    page.write_text(
        "# Probe\n\n## Its own heading\n\n[ok](#its-own-heading) [ok](configuration.md)\n"
        "[bad](#nowhere) [bad](no-such-page.md) [bad](configuration.md#nowhere)\n"
        "[pending](coming-soon.md) `[not a link](nowhere.md)`\n\n```\n[nor this](x.md)\n```\n",
        encoding="utf-8",
    )
    try:
        problems = broken_links(page, pending=frozenset({"docs/coming-soon.md"}))
        assert [p.split(":")[0] for p in problems] == [
            "#nowhere",
            "no-such-page.md",
            "configuration.md#nowhere",
        ]
        assert any("coming-soon.md" in p for p in broken_links(page, pending=frozenset()))
    finally:
        page.unlink()


def test_headings_get_githubs_anchors() -> None:
    assert slug("Who may do what: the deploy policy") == "who-may-do-what-the-deploy-policy"
    assert slug("Operating Buildkite from Slack: `/buildkite`") == (
        "operating-buildkite-from-slack-buildkite"
    )
    assert slug("One build per command, however slow Buildkite is") == (
        "one-build-per-command-however-slow-buildkite-is"
    )


def documented_default(value: object) -> str | None:
    """How the configuration page writes a field's default, or None when it has none to show."""
    if value is None or value == "" or value in ({}, []):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def settings_rows() -> dict[str, str]:
    """The configuration page's table rows, by the environment variable each one names."""
    rows = {}
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"^\| `([A-Z][A-Z0-9_]*)` \|", line):
            rows[match.group(1)] = line
    return rows


def env_names() -> dict[str, str]:
    """Each Settings field's environment variable, as pydantic-settings reads it."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    names = {}
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        names[field_name] = (prefix + (alias or field_name)).upper()
    return names


def test_every_setting_is_on_the_configuration_page_with_its_default() -> None:
    rows = settings_rows()
    names = env_names()
    assert len(names) >= 19  # the model was read, not an empty list
    for field_name, env in names.items():
        assert env in rows, f"{env} (Settings.{field_name}) is missing from docs/configuration.md"
        info = Settings.model_fields[field_name]
        required = "| yes |" in rows[env]
        assert required == info.is_required(), f"{env}: the Required column is wrong"
        if info.is_required():
            continue
        default = documented_default(info.get_default(call_default_factory=True))
        if default is not None:
            assert f"`{default}`" in rows[env], f"{env}: its default {default} is not shown"
    extra = set(rows) - set(names.values())
    assert not extra, f"docs/configuration.md documents settings the bot does not read: {extra}"


def ci_command() -> str:
    """The command line of .ci/run that installs and runs the checks (its last `&& pytest`)."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (line,) = [line for line in text.splitlines() if line.startswith("pip install ")]
    assert line.endswith("&& pytest"), line
    return line


def shell_blocks(path: Path) -> list[str]:
    """Each command line of the ```sh blocks of a page."""
    text = path.read_text(encoding="utf-8")
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_readme_runs_what_ci_runs() -> None:
    command = ci_command()
    commands = shell_blocks(README)
    assert command in commands, "the README's Development command differs from .ci/run's"
    install = command.split(" && ")[0]
    quick_test = [c for c in commands if c.endswith(f"&& {install} && pytest")]
    assert quick_test, "the README's quick-start test command installs otherwise than .ci/run"


def test_every_install_of_the_readme_uses_the_lock_the_image_installs() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (lock,) = re.findall(r"^RUN pip install -r (\S+)$", dockerfile, re.M)
    assert (ROOT / lock).is_file()
    installs = [
        part
        for line in shell_blocks(README)
        for part in line.split(" && ")
        if part.startswith("pip install")
    ]
    assert len(installs) >= 2  # the bot's quick start, the tests' and the Development one
    for install in installs:
        words = shlex.split(install)
        assert "-c" in words and words[words.index("-c") + 1] == lock, install


def test_the_readme_leads_and_stays_short() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    first_screen = "\n".join(text.splitlines()[:40])
    assert "python -m app sandbox" in first_screen
    assert sum(1 for line in shell_blocks(README)[:3] if "pip install" in line) >= 2
