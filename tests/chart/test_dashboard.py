"""The Grafana dashboard the chart ships: every query names metrics (and labels) the code exports,
and the chart renders it as a sidecar-labelled ConfigMap only when asked to."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ..architecture import metrics_catalog
from .test_chart import CHART, K8S, helm, render  # noqa: F401  (helm: the fixture)

DASHBOARD = CHART / "dashboards" / "kvpool.json"
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
            "unless", "inf", "nan"}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^}]*)\}")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, quantile labels)
    labels: set[str] = set()
    for match in _SELECTOR.finditer(text):
        labels.update(
            m.group(1) for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)", match.group(1))
        )
    text = _SELECTOR.sub(" ", text)
    for match in _GROUPING.finditer(text):
        labels.update(n.strip() for n in match.group(2).split(",") if n.strip())
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges: [5m], [$__rate_interval]
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    metrics = {
        m.group(0)
        for m in _IDENT.finditer(text)
        if m.group(0).lower() not in KEYWORDS
        and not text[m.end() :].lstrip().startswith("(")  # a function
        and not (m.start() and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."))  # 1e3
    }
    return metrics, labels


def problems(board: dict[str, Any], series: dict[str, metrics_catalog.Metric]) -> list[str]:
    """Each query that names a metric the code does not export, or a label its metrics lack."""
    out = []
    for panel in panels(board):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            metrics, labels = names_in(expr)
            where = f"panel {panel.get('title')!r}, query {target.get('refId')}"
            if not metrics:
                out.append(f"{where}: names no metric: {expr}")
            for name in sorted(metrics - series.keys()):
                out.append(f"{where}: {name} is not a metric kvpool exports (docs/metrics.md): {expr}")
            known = {label for name in metrics & series.keys() for label in series[name].labels}
            if any(name.endswith("_bucket") for name in metrics):
                known.add("le")
            for label in sorted(labels - known):
                out.append(f"{where}: no metric of this query has the label {label!r}: {expr}")
    return out


def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_query_names_exported_metrics_and_labels() -> None:
    found = problems(board(), metrics_catalog.series_index())
    assert not found, (
        "the dashboard's queries name metrics or labels the code does not export:\n  " + "\n  ".join(found)
    )


def test_an_unknown_metric_or_label_is_reported_with_its_panel() -> None:
    bad = {
        "panels": [
            {"type": "row", "title": "r", "panels": [
                {"title": "Hit ratio", "targets": [
                    {"refId": "A", "expr": "sum(rate(kvpool_connector_hit_tokens_totl[5m]))"}]}]},
            {"title": "Tiers", "targets": [
                {"refId": "B", "expr": 'sum by (tiers) (kvpool_tier_usage_bytes{tier="memory"})'}]},
            {"title": "Latency", "targets": [
                {"refId": "C", "expr": "histogram_quantile(0.99, sum by (le) (rate(kvpool_tier_read_seconds_bucket[5m])))"},
                {"refId": "D", "expr": "kvpool_tier_usage_bytes_bucket"}]},
        ]
    }  # fmt: skip
    found = problems(bad, metrics_catalog.series_index())
    assert len(found) == 3, found
    assert found[0].startswith("panel 'Hit ratio', query A: kvpool_connector_hit_tokens_totl is not a metric")
    assert found[1].startswith("panel 'Tiers', query B: no metric of this query has the label 'tiers'")
    assert found[2].startswith("panel 'Latency', query D: kvpool_tier_usage_bytes_bucket is not a metric")


def test_the_parser_reads_promql() -> None:
    assert names_in(
        'histogram_quantile(0.99, sum by (le, op) (rate(kvpool_node_request_seconds_bucket{op=~"get|put"}[$__rate_interval])))'
    ) == ({"kvpool_node_request_seconds_bucket"}, {"le", "op"})
    assert names_in("sum(a_total) / on (tier) group_left sum without (x) (b) > bool 1e3") == (
        {"a_total", "b"},
        {"tier", "x"},
    )


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Hit ratio, tokens saved, tier usage against budget, latency percentiles, errors, breaker
    states, lookup index size and event lag; miss reasons once the connector exports them."""
    used = set()
    for panel in panels(board()):
        for target in panel.get("targets", []):
            used |= names_in(target["expr"])[0]
    wanted = {
        "kvpool_connector_hit_tokens_total",
        "kvpool_connector_requested_tokens_total",
        "kvpool_connector_loaded_tokens_total",
        "kvpool_tier_usage_bytes",
        "kvpool_tier_capacity_bytes",
        "kvpool_node_request_seconds_bucket",
        "kvpool_connector_load_seconds_bucket",
        "kvpool_connector_errors_total",
        "kvpool_node_errors_total",
        "kvpool_tier_breaker_state",
        "kvpool_lookup_keys",
        "kvpool_lookup_index_bytes",
        "kvpool_lookup_event_lag_seconds_bucket",
    }
    if "kvpool_connector_miss_tokens_total" in metrics_catalog.exported():
        wanted.add("kvpool_connector_miss_tokens_total")
    assert wanted - used == set()
    ids = [p["id"] for p in panels(board())]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = board()["templating"]["list"]
    assert [v["name"] for v in variables if v["type"] == "datasource"] == ["datasource"]


def _configmaps(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboards")]


def test_the_chart_renders_the_dashboard_only_when_enabled(helm: str) -> None:  # noqa: F811
    assert _configmaps(render(helm)) == []
    (cm,) = _configmaps(render(helm, "--set", "dashboards.enabled=true"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "kvpool-system" and "annotations" not in cm["metadata"]
    assert json.loads(cm["data"]["kvpool.json"]) == board()
    kubernetes_validate.validate(cm, K8S, strict=True)
    (cm,) = _configmaps(render(helm, "--set", "dashboards.enabled=true", "--set", "dashboards.label=example.com/dashboard",
                               "--set", "dashboards.labelValue=kvpool", "--set", "dashboards.namespace=monitoring",
                               "--set", "dashboards.annotations.grafana_folder=kvpool"))  # fmt: skip
    assert cm["metadata"]["labels"]["example.com/dashboard"] == "kvpool"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "kvpool"}
    assert json.loads(cm["data"]["kvpool.json"]) == board()
    kubernetes_validate.validate(cm, K8S, strict=True)


def test_the_chart_lints_with_the_dashboard(helm: str) -> None:  # noqa: F811
    out = subprocess.run([helm, "lint", "--strict", str(CHART), "--set", "dashboards.enabled=true"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    values = yaml.safe_load((CHART / "values.yaml").read_text())["dashboards"]
    assert (
        values["enabled"] is False and values["label"] == "grafana_dashboard" and values["labelValue"] == "1"
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "dashboards.enabled=yes"],
        ["--set", "dashboards.label=not a label"],
        ["--set", "dashboards.labelValue=-x"],
        ["--set", "dashboards.namespace=Monitoring"],
        ["--set", "dashboards.folder=kvpool"],
    ],
)
def test_the_schema_refuses_bad_dashboard_values(helm: str, bad: list[str]) -> None:  # noqa: F811
    out = subprocess.run(
        [helm, "template", "kvpool", str(CHART), *bad], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, (
        out.stderr
    )
