"""deploy/grafana's dashboard: a well-formed Grafana dashboard whose every PromQL expression
reads only series the bot exports (taken from its real registry), with the Prometheus data
source chosen at import."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.ops.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "buildkite-chatops.json"

#: The series a Prometheus scrape of each metric type holds (prometheus_client's exposition).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile",
    "rate", "irate", "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max",
    "abs", "time", "vector", "scalar",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
KEYWORDS |= {"and", "or", "unless", "offset"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def exported_series() -> dict[str, str]:
    """Every series name the bot's /metrics can hold, to its metric family's name."""
    series = {}
    for family in Metrics().registry.collect():
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = family.name
    return series


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found += all_panels(panel.get("panels", []))
    return found


def expressions() -> list[str]:
    exprs = [
        target["expr"]
        for panel in all_panels(dashboard()["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # Grafana's label_values(<series selector>, <label>): the selector is PromQL.
            found = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", text)
            assert found, f"not a label_values() query: {text}"
            exprs.append(found.group(1))
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, checking its syntax on the way: balanced
    brackets, well-formed label matchers and ranges, and only known functions."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    # String literals first: a label value may hold anything, `$job` included.
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in expr:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            assert depth[closing[char]] >= 0, f"unbalanced {char!r} in {expr}"
    assert all(d == 0 for d in depth.values()), f"unbalanced brackets in {expr}"
    matcher = r'\s*[A-Za-z_][A-Za-z0-9_]*\s*(?:=~|!~|!=|=)\s*""\s*'
    for labels in re.findall(r"\{([^{}]*)\}", expr):
        assert re.fullmatch(rf"(?:{matcher}(?:,{matcher})*,?)?", labels), (labels, expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    for duration in re.findall(r"\[([^\[\]]*)\]", expr):
        assert re.fullmatch(r"\s*(?:\d+(?:ms|[smhdwy]))+\s*", duration), (duration, expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group()
        if re.match(r"\s*\(", expr[match.end() :]):
            assert word in FUNCTIONS, f"unknown function {word} in {expr}"
        elif word not in KEYWORDS and not re.fullmatch(r"[0-9.e]+", word):
            names.add(word)
    return names


def test_every_expression_reads_only_series_the_bot_exports() -> None:
    exported = exported_series()
    exprs = expressions()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        unknown = names - set(exported)
        assert not unknown, f"{expr}: {sorted(unknown)} is not exported by the bot"
        used |= {exported[name] for name in names}
    # What an operator watches first (issue #16): each has a panel.
    assert {
        "bkchatops_slack_requests",
        "bkchatops_slack_ack_seconds",
        "bkchatops_buildkite_requests",
        "bkchatops_buildkite_rate_limit_remaining",
        "bkchatops_builds_pending",
        "bkchatops_webhooks",
        "bkchatops_poll_backoff_seconds",
    } <= used


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(bkchatops_slack_requests[5m]))",  # a counter's family name is no series
        "rate(bkchatops_slack_ack_seconds[5m])",  # nor a histogram's
        "sum(rate(bkchatops_no_such_metric_total[5m]))",
    ],
)
def test_a_series_the_bot_does_not_export_is_caught(expr: str) -> None:
    assert metric_names(expr) - set(exported_series())


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(bkchatops_webhooks_total[5m])",
        'bkchatops_webhooks_total{result="ok"',
        "bkchatops_webhooks_total{result=ok}",
        "rate(bkchatops_webhooks_total[five])",
        "sume(bkchatops_webhooks_total)",
    ],
)
def test_a_malformed_expression_is_caught(expr: str) -> None:
    with pytest.raises(AssertionError):
        metric_names(expr)


def test_histogram_quantiles_read_buckets_by_le() -> None:
    exported = exported_series()
    for expr in expressions():
        if "histogram_quantile" in expr:
            assert all(name.endswith("_bucket") for name in metric_names(expr) if name in exported)
            assert re.search(r"by \([^)]*\ble\b", expr), expr


def test_the_dashboard_has_grafanas_shape() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert isinstance(board["schemaVersion"], int)
    [source] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": "${" + source["name"] + "}"}
    panels = all_panels(board["panels"])
    ids = [panel["id"] for panel in panels]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["datasource"] == reference, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == reference and target["expr"].strip(), panel["title"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == reference
    # Panels do not overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
