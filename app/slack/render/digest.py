"""The build-health digest: a table per pipeline, the most failing, and the flaky ones."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.slack.mrkdwn import code, escape, link, preformatted
from app.slack.render.common import Rendered, context, cost, seconds_text, section


@dataclass(frozen=True)
class PipelineHealth:
    """One pipeline's figures over a digest's window (see app.core.digest for the definitions)."""

    slug: str
    builds: int
    passed: int
    failed: int
    #: passed / (passed + failed); None when none of its builds passed or failed.
    pass_rate: float | None
    #: Nearest-rank median and 95th percentile of passed and failed builds' durations (s).
    median: int | None
    p95: int | None
    #: Passed builds in which some job had been retried, and their URLs.
    flaky: int = 0
    flaky_urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Digest:
    scope: str
    window: str
    since: datetime
    until: datetime
    pipelines: tuple[PipelineHealth, ...]
    top_failing: tuple[PipelineHealth, ...]
    flaky: tuple[PipelineHealth, ...]
    builds_read: int
    requests: int
    #: Passed builds re-read with their jobs to spot retried jobs (None: not looked at).
    jobs_read: int | None
    capped: bool = False
    #: Set when a scheduled digest is posted after its time (the bot was down).
    late_for: datetime | None = None


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


def _utc(moment: datetime) -> str:
    return moment.strftime("%d %b %H:%M UTC")


def _table(rows: list[PipelineHealth]) -> str:
    shown = rows[:25]
    width = max(8, *(len(p.slug) for p in shown))
    header = f"{'pipeline':<{width}}  builds   pass   median      p95  failed"
    lines = [
        f"{preformatted(p.slug):<{width}}  {p.builds:>6}  {_percent(p.pass_rate):>5}  "
        f"{seconds_text(p.median):>7}  {seconds_text(p.p95):>7}  {p.failed:>6}"
        for p in shown
    ]
    more = f"\n…and {len(rows) - len(shown)} more pipelines" if len(rows) > len(shown) else ""
    return "```" + "\n".join([header, *lines]) + "```" + more


def _flaky(digest: Digest) -> str:
    if not digest.flaky:
        return "*Flaky:* no passed build needed a retried job."
    flaky = [
        f"• {code(p.slug)}: {p.flaky} passed build{'s' if p.flaky != 1 else ''} "
        "after a "
        "retried job ("
        + ", ".join(link(url, f"#{url.rsplit('/', 1)[-1]}") for url in p.flaky_urls[:5])
        + ")"
        for p in digest.flaky
    ]
    return "*Flaky: failures that passed on a retry*\n" + "\n".join(flaky)


def health_digest(digest: Digest) -> Rendered:
    """The build-health digest: a table per pipeline, the worst three, and the flaky ones."""
    scope = "all pipelines" if digest.scope == "all" else digest.scope
    title = f":bar_chart: *Build health of {escape(scope)}, last {digest.window}*"
    title += f" ({_utc(digest.since)} to {_utc(digest.until)})"
    if digest.late_for is not None:
        title += (
            f"\n:hourglass: Scheduled for {_utc(digest.late_for)}; posted late because the bot "
            "was not running then."
        )
    blocks = [section(title)]
    rows = sorted(digest.pipelines, key=lambda p: (-p.builds, p.slug))
    if not rows:
        blocks.append(section("No builds in this window."))
    else:
        blocks.append(section(_table(rows)))
        if digest.top_failing:
            worst = [
                f"• {code(p.slug)}: {p.failed} failed of {p.builds} "
                f"(pass rate {_percent(p.pass_rate)})"
                for p in digest.top_failing
            ]
            blocks.append(section("*Most failures*\n" + "\n".join(worst)))
        if digest.jobs_read is not None:
            blocks.append(section(_flaky(digest)))
    jobs = (
        f", of which {digest.jobs_read} passed builds re-read with their jobs to spot retries"
        if digest.jobs_read is not None
        else ""
    )
    capped = " Only the newest builds were read (cap reached)." if digest.capped else ""
    blocks.append(
        context(
            f"Read {digest.builds_read} builds in {cost(digest.requests)} (100 per page{jobs})."
            f"{capped} Pass rate = passed / (passed + failed); durations from start to finish of "
            "passed and failed builds; median and p95 by nearest rank."
        )
    )
    text = f"Build health of {escape(scope)}, last {digest.window}"
    return Rendered(text=text, blocks=blocks)
