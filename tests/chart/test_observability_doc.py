"""docs/observability.md stays true: its example alerts name only metrics and labels kvpool
exports (scrape-target labels such as `pod` aside), and its miss-reason table lists exactly the
reasons the connector counts."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from kvpool.connector import miss_reasons

from ..architecture import metrics_catalog
from .test_dashboard import names_in

DOC = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
SCRAPE_LABELS = {"pod", "namespace", "job", "instance", "container", "le"}
"""Labels Prometheus adds to every series it scrapes (and histograms' buckets)."""


def rules() -> list[dict]:
    (block,) = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    return [rule for group in yaml.safe_load(block)["groups"] for rule in group["rules"]]


def test_every_alert_names_exported_metrics_and_labels() -> None:
    series = metrics_catalog.series_index()
    found = []
    for rule in rules():
        metrics, labels = names_in(rule["expr"])
        assert metrics, rule["alert"]
        found += [f"{rule['alert']}: {m} is not exported" for m in sorted(metrics - series.keys())]
        known = {label for name in metrics & series.keys() for label in series[name].labels} | SCRAPE_LABELS
        found += [f"{rule['alert']}: no metric has the label {label!r}" for label in sorted(labels - known)]
    assert not found, "\n".join(found)
    assert len(rules()) >= 10


def test_the_miss_reason_table_lists_every_reason_the_connector_counts() -> None:
    section = DOC.read_text().split("## Why a request missed", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M)) - {"reason"}  # the header
    assert documented == set(miss_reasons.REASONS)
