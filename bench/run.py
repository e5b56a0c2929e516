"""Run every benchmark once, print one table (figure, baseline, ratio, target), optionally as JSON.

python -m bench                      # the full run (about 5 minutes)
python -m bench --quick              # smaller and shorter (about 1.5 minutes)
python -m bench --json bench/results.json
python -m bench --only 7             # some items: 1, 2, 3, 6 (App Home), 7 (agents on /mcp)
python -m bench --check              # exit 1 on a >2x regression against bench/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ack, agents, home, polling, webhooks
from bench.common import code_fingerprint, machine, median, percentile, redis_url

COMMITTED = Path(__file__).resolve().parent / "results.json"
REGRESSION_FACTOR = 2.0

MODES: dict[str, dict[str, Any]] = {
    "full": {
        "ack_seconds": 20.0,
        "poll_builds": 1000,
        "poll_window": 600.0,
        "poll_channels": 100,
        "webhook_builds": 1000,
        "burst": 100,
        "mcp_calls": 2000,
        "mcp_window": 60.0,
        "mcp_wakes": 300,
    },
    "quick": {
        "ack_seconds": 10.0,
        "poll_builds": 300,
        "poll_window": 180.0,
        "poll_channels": 100,
        "webhook_builds": 300,
        "burst": 30,
        "mcp_calls": 500,
        "mcp_window": 20.0,
        "mcp_wakes": 100,
    },
}


@dataclass
class Row:
    """One figure of the table, next to its baseline."""

    id: str
    item: str
    figure: str
    value: float
    unit: str
    baseline: float | None
    baseline_label: str
    target: str = ""
    passed: bool | None = None
    #: "lower" or "higher" is better; decides what a regression is.
    better: str = "lower"
    #: True when the figure grows with the run's size (not compared across modes).
    scales: bool = False

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or math.isnan(self.value):
            return None
        return self.value / self.baseline


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if abs(value) >= 100 or float(value).is_integer():
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    lines = [
        "| # | Figure | Ours | Baseline | Ratio | Target | Pass |",
        "|---|---|---:|---:|---:|---|:---:|",
    ]
    for row in rows:
        baseline = f"{fmt(row.baseline, row.unit)} ({row.baseline_label})"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
        verdict = {True: "pass", False: "**MISS**", None: "—"}[row.passed]
        lines.append(
            f"| {row.item} | {row.figure} | {fmt(row.value, row.unit)} | {baseline} | {ratio} "
            f"| {row.target or '—'} | {verdict} |"
        )
    return "\n".join(lines)


# -- the benchmarks, each turned into rows ----------------------------------------------------


async def bench_ack(url: str, mode: dict[str, Any], notes: list[str]) -> list[Row]:
    result = await ack.run(url, seconds=mode["ack_seconds"])
    bot, bare, fakes = result["bot"], result["bare"], result["fakes"]
    notes.append(
        f"1: 50 closed-loop clients, {mode['ack_seconds']:.0f} s per server after 1 s warm-up; "
        f"medians of {bot['windows']} windows of 5 s. Acked /deploy: bot {bot['requests']:,} "
        f"(failed {bot['failed']}), bare {bare['requests']:,} (failed {bare['failed']}). "
        f"Meanwhile the bot created {fakes.get('buildkite_creates', '?')} builds in "
        f"{fakes.get('buildkite_requests', '?')} Buildkite requests, and posted "
        f"{fakes.get('slack_calls', {}).get('chat.postMessage', 0)} Slack messages; bot log "
        f"errors: {bot['error_log_lines']}. Of the bot's acks, {bot.get('queued', 0):,} put a "
        f"deploy in line and {bot.get('refused', 0):,} refused one (the queue of 4 running and 100 "
        "waiting was full): the rest of the burst is told to try again, in the ack."
    )
    within = bot["p99_ms"] <= 1.2 * bare["p99_ms"] and bot["p99_ms"] < 100
    return [
        Row("ack.p50", "1", "/deploy ack latency p50", bot["p50_ms"], "ms", bare["p50_ms"],
            "bare Bolt"),
        Row("ack.p99", "1", "/deploy ack latency p99", bot["p99_ms"], "ms", bare["p99_ms"],
            "bare Bolt", "≤1.2x bare and <100 ms", within),
        Row("ack.throughput", "1", "/deploy acks per second", bot["throughput"], "/s",
            bare["throughput"], "bare Bolt", better="higher"),
    ]  # fmt: skip


async def bench_polling(url: str, mode: dict[str, Any], notes: list[str]) -> list[Row]:
    builds, window = mode["poll_builds"], mode["poll_window"]
    sim = await polling.simulate(
        url, builds=builds, window=window, channels=mode["poll_channels"], webhooks=False
    )
    hooked = await polling.simulate(
        url, builds=builds, window=window, channels=mode["poll_channels"], webhooks=True
    )
    first = sim.per_minute(sim.requests, sim.start, sim.start + 60)
    naive_first = sim.per_minute(sim.naive_requests, sim.start, sim.start + 60)
    average = len(sim.requests) / (window / 60)
    naive_average = len(sim.naive_requests) / (window / 60)
    per_build = len(hooked.requests) / builds
    naive_per_build = len(hooked.naive_requests) / builds
    notes.append(
        f"2: {builds:,} builds in {mode['poll_channels']} channels, finishing uniformly within "
        f"{window / 60:.0f} min of simulated time, POLL_INTERVAL {polling.POLL_INTERVAL:.0f}; "
        f"{sim.polls} polls ({len(sim.requests)} requests, i.e. pages) in the window; every "
        f"Buildkite request takes {polling.BUILDKITE_LATENCY} s of simulated time. Final thread "
        f"reply lag p50 {median(sim.reply_lags):.1f} s, p99 {percentile(sim.reply_lags, 99):.1f} "
        f"s. With webhooks: {len(hooked.requests)} requests for {builds:,} builds after their "
        f"creation, all of them poll pages ({hooked.polls} polls). Real time: "
        f"{sim.real_seconds:.0f} s + {hooked.real_seconds:.0f} s."
    )
    starts = [began for began, _ in sim.poll_times]
    after_poll = [lag - wait for lag, wait in zip(sim.lags, sim.waits, strict=True)]
    notes.append(
        f"2, where the lag goes: a poll takes {median([e - b for b, e in sim.poll_times]):.1f} s "
        f"(median, simulated) so polls start every "
        f"{median([b - a for a, b in itertools.pairwise(starts)]):.1f} s; from a build's end to "
        f"the poll that sees it: p50 {median(sim.waits):.1f} s, p99 "
        f"{percentile(sim.waits, 99):.1f} s; from that poll's start to the Slack update: p50 "
        f"{median(after_poll):.1f} s, p99 {percentile(after_poll, 99):.1f} s."
    )
    notes.append(
        f"5 (during 2, on the simulated clock): {sim.posts:,} posts, smallest gap between two "
        f"posts in one channel "
        f"{sim.post_gap_min:.3f} s; {sim.edits:,} edits, smallest gap between two edits of one "
        f"message {sim.edit_gap_min:.2f} s."
    )
    lag_p99 = percentile(sim.lags, 99)
    return [
        Row("poll.requests_first_minute", "2",
            f"Buildkite requests/min, first minute (~{builds:,} in flight)", first, "/min",
            naive_first, "naive 10 s GET", "<20/min at 1,000 builds",
            first < 20 if builds >= 1000 else None, scales=True),
        Row("poll.requests_average", "2", "Buildkite requests/min, whole window", average, "/min",
            naive_average, "naive 10 s GET", scales=True),
        Row("poll.lag_p50", "2", "finish → Slack update lag p50 (polling)", median(sim.lags), "s",
            median(sim.naive_lags), "naive 10 s GET"),
        Row("poll.lag_p99", "2", "finish → Slack update lag p99 (polling)", lag_p99, "s",
            percentile(sim.naive_lags, 99), "naive 10 s GET", "≤15 s", lag_p99 <= 15),
        Row("webhooks.requests_per_build", "2", "Buildkite requests per build, webhooks on",
            per_build, "", naive_per_build, "naive 10 s GET", "≤1", per_build <= 1),
        Row("budget.posts_per_channel", "5", "most posts in one channel in any 1 s (during 2)",
            sim.max_posts_per_channel_second, "", 1, "Slack's limit", "≤1",
            sim.max_posts_per_channel_second <= 1),
        Row("budget.edits_per_message", "5", "most edits of one message in any 1 s (during 2)",
            sim.max_edits_per_message_second, "", 1, "Slack's limit", "≤1",
            sim.max_edits_per_message_second <= 1),
    ]  # fmt: skip


async def bench_webhooks(url: str, mode: dict[str, Any], notes: list[str]) -> list[Row]:
    builds = mode["webhook_builds"]
    result = await webhooks.run(url, builds=builds, burst=mode["burst"])
    bot, bare, burst = result["bot"], result["bare"], result["burst"]
    tracked, final = result["redis_tracked"], result["redis_final"]
    per_build = sum(tracked["bytes"].values()) / builds
    breakdown = ", ".join(
        f"{kind} {size / builds:,.0f}"
        for kind, size in sorted(tracked["bytes"].items(), key=lambda kv: -kv[1])
    )
    per_build_no_ttl = [
        key for key in final["no_ttl"] if key.rsplit(":", 1)[-1] not in ("events", "audit")
    ]
    notes.append(
        f"3: {builds:,} builds, one channel each (so no post pacing), running then passed by "
        f"signed webhooks at {result['rate']:.0f}/s; latency from sending the `build.finished` "
        f"webhook to its `chat.update` reaching the fake; medians of {webhooks.WINDOWS} windows; "
        f"max {fmt(bot['max_ms'], 'ms')} (bare {fmt(bare['max_ms'], 'ms')}). Webhooks refused "
        f"by the bot: {result['refused']}; bot log errors: {result['bot_error_log_lines']}; "
        f"bot CPU per webhook {fmt(bot.get('cpu_ms_per_webhook'), 'ms')} "
        f"({100 * bot.get('cpu_share', float('nan')):.0f}% of a core). "
        f"When the bot's updates per second fall below the 100 webhooks/s sent, its queue grows "
        f"for the whole run and the latency with it, so this figure swings with machine load."
    )
    notes.append(
        f"4: Redis bytes per running build (MEMORY USAGE SAMPLES 0, shared keys included): "
        f"{breakdown}. Keys without TTL once every build was final: "
        f"{', '.join(final['no_ttl']) or 'none'}; longest TTL left by kind (days): "
        f"{json.dumps(final['longest_ttl_days'], sort_keys=True)}; pending set: "
        f"{result['pending_after']} builds."
    )
    notes.append(
        f"5 (webhook burst): {burst['builds']} builds each sent running, failing, failed 100 ms "
        f"apart: {burst['edits']} edits, smallest gap between two edits of one message "
        f"{burst['edit_gap_min']:.2f} s; {burst['posts']} posts, smallest gap in one channel "
        f"{burst['post_gap_min']:.3f} s."
    )
    return [
        Row("webhook.p50", "3", "webhook → chat.update p50 at 100/s", bot["p50_ms"], "ms",
            bare["p50_ms"], "bare relay"),
        Row("webhook.p99", "3", "webhook → chat.update p99 at 100/s", bot["p99_ms"], "ms",
            bare["p99_ms"], "bare relay", "<50 ms", bot["p99_ms"] < 50),
        Row("webhook.throughput", "3", "chat.updates per second while sent 100 webhooks/s",
            bot["updates_per_second"], "/s", bare["updates_per_second"], "bare relay",
            better="higher"),
        Row("redis.bytes_per_build", "4", f"Redis bytes per tracked build ({builds:,} running)",
            per_build, "B", result["build_json_bytes"], "build JSON", "<2 KB", per_build < 2048),
        Row("redis.per_build_keys_without_ttl", "4", "per-build keys without TTL once final",
            len(per_build_no_ttl), "", None, "—", "0", not per_build_no_ttl),
        Row("rss.idle", "4", "bot RSS, idle", result["rss_idle_mb"], "MB",
            result["bare_rss_idle_mb"], "bare Bolt idle"),
        Row("rss.tracked", "4", f"bot RSS, {builds:,} tracked builds", result["rss_tracked_mb"],
            "MB", result["rss_idle_mb"], "bot idle", "<150 MB at 1,000 builds",
            result["rss_tracked_mb"] < 150 if builds >= 1000 else None),
        Row("budget.burst_edits_per_message", "5",
            "most edits of one message in any 1 s (webhook burst)",
            burst["max_edits_per_message_second"], "", 1, "Slack's limit", "≤1",
            burst["max_edits_per_message_second"] <= 1),
        Row("budget.burst_posts_per_channel", "5",
            "most posts in one channel in any 1 s (webhook burst)",
            burst["max_posts_per_channel_second"], "", 1, "Slack's limit", "≤1",
            burst["max_posts_per_channel_second"] <= 1),
    ]  # fmt: skip


async def bench_agents(url: str, mode: dict[str, Any], notes: list[str]) -> list[Row]:
    window = mode["mcp_window"]
    result = await agents.run(
        url, calls=mode["mcp_calls"], rounds=10, window=window, wakes=mode["mcp_wakes"]
    )
    bot, bare = result["get_build"]["bot"], result["get_build"]["bare"]
    wake, asked = result["wake_summary"], result["requests"]
    per_minute = 60 / window
    alone = (asked["before"] + asked["after"]) / 2 * per_minute
    waiting = asked["waiting"] * per_minute
    extra = waiting - alone
    notes.append(
        f"7: one agent (the SDK's ClientSession over Streamable HTTP, bearer token) calling in "
        f"turn; {bot['calls']:,} get_build calls to each server in 10 alternating rounds after 50 "
        f"of warm-up, medians of {webhooks.WINDOWS} windows; max {fmt(bot['max_ms'], 'ms')} "
        f"(bare {fmt(bare['max_ms'], 'ms')}). The bot answers a build read from its 2 s Redis "
        f"cache, else from Buildkite. Wake-ups: {wake['webhooks']} builds in turn, the wait under "
        f"way {agents.WAIT_HEADSTART * 1000:.0f} ms before the signed build.finished webhook; over "
        f"all of them p50 {fmt(wake['all_p50_ms'], 'ms')}, p99 {fmt(wake['all_p99_ms'], 'ms')}, "
        f"max {fmt(wake['max_ms'], 'ms')}; the webhook answered after p50 "
        f"{fmt(wake['acked_p50_ms'], 'ms')}, p99 {fmt(wake['acked_p99_ms'], 'ms')}, the bot's "
        f"announcement of the change heard ({wake['announced']} of them) after p50 "
        f"{fmt(wake['announced_p50_ms'], 'ms')}, p99 {fmt(wake['announced_p99_ms'], 'ms')}. "
        f"Requests: {agents.WAITED_BUILDS} running builds, "
        f"POLL_INTERVAL {agents.POLL_INTERVAL:.0f} s, windows of {window:.0f} s starting between "
        f"two polls: tracker alone {asked['before']} then {asked['after']} requests, with the "
        f"agent waiting on all {agents.WAITED_BUILDS} at once {asked['waiting']} "
        f"({asked['waits_answered']} waits answered, {asked['waiting_build_reads']} build reads, "
        f"{asked['waiting_not_polls']} requests other than the tracker's polls, against "
        f"{asked['not_polls_alone']} in the tracker's windows; "
        f"paths: {', '.join(asked['waiting_paths']) or 'none'}). Bot log errors: "
        f"{result['bot_error_log_lines']}."
    )
    return [
        Row("mcp.get_build_p50", "7", "get_build over /mcp, p50", bot["p50_ms"], "ms",
            bare["p50_ms"], "bare MCP server"),
        Row("mcp.get_build_p99", "7", "get_build over /mcp, p99", bot["p99_ms"], "ms",
            bare["p99_ms"], "bare MCP server"),
        Row("mcp.wake_p50", "7", "webhook → wait_for_build return p50", wake["p50_ms"], "ms",
            None, "—"),
        Row("mcp.wake_p99", "7", "webhook → wait_for_build return p99", wake["p99_ms"], "ms",
            None, "—", "<50 ms", wake["p99_ms"] < 50),
        Row("mcp.wait_requests_per_minute", "7",
            f"Buildkite requests/min of an agent waiting on {agents.WAITED_BUILDS} builds, not "
            "the tracker's polls", asked["waiting_not_polls"] * per_minute, "/min", alone,
            "tracker alone", "0", asked["waiting_not_polls"] == 0),
        Row("mcp.wait_requests_difference", "7",
            "the same, as the waits' window less the tracker alone's", extra, "/min", alone,
            "tracker alone", "≈0 (± a poll's pages)"),
    ]  # fmt: skip


async def bench_home(url: str, mode: dict[str, Any], notes: list[str]) -> list[Row]:
    result = await home.run(url, people=100)
    people = result["people"]
    notes.append(
        f"6: one build followed by {people} people (one channel each), every Home opened; a "
        f"signed webhook moves it to running: {result['one_change_calls']} views.publish calls "
        f"until the last Home shows it; then failing and failed within the 5 s debounce: "
        f"{result['burst_calls']} calls until every Home shows Failed (the first change at once, "
        f"the rest at the window's end) in {fmt(result['burst_s'], 's')}. Baseline: the same "
        f"{people} publishes back to back from a bare client, {fmt(result['bare_s'], 's')}. "
        f"Unexpected requests: {len(result['unexpected'])}. Where the time goes (first Slack "
        f"call of the change to): the build's {people} messages and replies written "
        f"{fmt(result['split']['messages_s'], 's')}, first publish "
        f"{fmt(result['split']['first_publish_after_s'], 's')}, first to last publish "
        f"{fmt(result['split']['publishes_s'], 's')}."
    )
    return [
        Row("home.republish_100", "6", f"state change → {people} Homes republished",
            result["one_change_s"], "s", result["bare_s"], "bare publishes"),
        Row("home.publishes_100", "6", f"views.publish calls for one change, {people} people",
            result["one_change_calls"], "", people, "one per person", f"≤{people}",
            result["one_change_calls"] <= people),
        Row("home.burst_publishes_100", "6",
            f"views.publish calls for 2 changes within 5 s, {people} people",
            result["burst_calls"], "", 2 * people, "one per person and change", f"≤{2 * people}",
            result["burst_calls"] <= 2 * people),
    ]  # fmt: skip


BENCHES: dict[str, Callable[[str, dict[str, Any], list[str]], Coroutine[Any, Any, list[Row]]]] = {
    "1": bench_ack,
    "2": bench_polling,
    "3": bench_webhooks,
    "6": bench_home,
    "7": bench_agents,
}
TIMEOUT = 900.0


async def run_all(only: set[str], mode: dict[str, Any], notes: list[str]) -> list[Row]:
    rows: list[Row] = []
    with redis_url() as url:
        for key, bench in BENCHES.items():
            if key not in only:
                continue
            started = time.monotonic()
            print(f"running item {key} ...", file=sys.stderr, flush=True)
            rows += await asyncio.wait_for(bench(url, mode, notes), TIMEOUT)
            print(f"  done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


# -- regressions against the committed results ----------------------------------------------


def regressions(rows: list[Row], committed: dict[str, Any], mode: str) -> list[str]:
    """Figures more than 2x worse than the committed run's (same mode for those that scale)."""
    before = {row["id"]: row for row in committed.get("rows", [])}
    found = []
    for row in rows:
        old = before.get(row.id)
        if old is None or (row.scales and committed.get("mode") != mode):
            continue
        was, now = float(old["value"]), row.value
        if math.isnan(now) or math.isnan(was):
            continue
        if row.better == "lower":
            worse = now > REGRESSION_FACTOR * was if was > 0 else now > 0
        else:
            worse = now < was / REGRESSION_FACTOR
        if worse:
            found.append(
                f"REGRESSION: {row.id} ({row.figure}): {fmt(now, row.unit)} now, "
                f"{fmt(was, row.unit)} in {COMMITTED.name} ({row.better} is better)"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, shorter run (~1.5 min)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the table as JSON")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 on a >2x regression against results.json"
    )
    parser.add_argument(
        "--only",
        default="1,2,3,6,7",
        help="items to run: 1 (ack), 2 (polling, 5), 3 (webhooks, 4, 5), 6 (App Home), "
        "7 (agents on /mcp)",
    )
    args = parser.parse_args(argv)
    # On SIGTERM, unwind like on Ctrl-C so that redis-server and the children are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    mode_name = "quick" if args.quick else "full"
    committed = json.loads(COMMITTED.read_text()) if COMMITTED.exists() else None
    notes: list[str] = []
    started = time.monotonic()
    load_before = round(os.getloadavg()[0], 2)
    code = code_fingerprint()
    rows = asyncio.run(run_all(set(args.only.split(",")), MODES[mode_name], notes))
    about = machine()
    about["code"] = code
    about["loadavg_1min_before_after"] = [load_before, round(os.getloadavg()[0], 2)]
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"\n{mode_name} run, {time.monotonic() - started:.0f} s; {about['nproc']} cores, "
        f"{about['cpu']}, Python {about['python']}, {about['os']}; 1-min load average "
        f"{load_before} before, {about['loadavg_1min_before_after'][1]} after; code "
        f"{code['commit']} + working tree {code['packages_sha256']}\n"
    )
    print(table(rows))
    print()
    for note in notes:
        print(f"- {note}")
    found = regressions(rows, committed, mode_name) if committed else []
    for line in found:
        print(line)
    if committed is None:
        print(f"\n(no {COMMITTED.name} to compare with)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mode": mode_name,
                    "command": command.strip(),
                    "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "seconds": round(time.monotonic() - started),
                    "machine": about,
                    "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
                    "notes": notes,
                },
                indent=2,
                allow_nan=False,
                default=str,
            )
            + "\n"
        )
    return 1 if found and args.check else 0
