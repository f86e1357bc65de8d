"""docs/metrics.md lists exactly the metrics the code exports, with their types and label names
(and, where the code keeps a label's values in one constant, exactly those values).

The code side is read from the metric objects (metrics_catalog.py); the doc side from the rows of
its tables: | `name` | type | labels (label names in backticks, values after a colon) | process |
meaning |.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from . import metrics_catalog

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
_ROW = re.compile(r"^\|\s*`(kvpool_\w+)`\s*\|(.*)\|\s*$")
_LABEL = re.compile(r"`(\w+)`")


@dataclasses.dataclass(frozen=True)
class DocRow:
    name: str
    type: str
    labels: tuple[str, ...]
    line: int
    labels_cell: str = ""

    def values(self, label: str) -> set[str]:
        """The values the doc lists for ``label`` (after "`label`:", up to ";")."""
        match = re.search(rf"`{label}`:([^;`]*)", self.labels_cell)
        return {v.strip() for v in match.group(1).split(",") if v.strip()} if match else set()


def doc_rows(text: str) -> list[DocRow]:
    """The metric rows of docs/metrics.md; a malformed row raises with its line number."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        match = _ROW.match(line)
        if not match:
            assert not re.match(r"^\|\s*`kvpool_", line), (
                f"docs/metrics.md:{number}: a metric row must read | `name` | type | labels | process | meaning |"
            )
            continue
        cells = [c.strip() for c in match.group(2).split(" | ")]
        assert len(cells) == 4 and all(cells), (
            f"docs/metrics.md:{number}: {match.group(1)}: expected 4 non-empty cells after the name "
            f"(type, labels, process, meaning), got {cells}"
        )
        labels = () if cells[1] == "—" else tuple(_LABEL.findall(cells[1]))
        rows.append(DocRow(match.group(1), cells[0], labels, number, cells[1]))
    return rows


def differences(rows: list[DocRow], code: dict[str, metrics_catalog.Metric]) -> list[str]:
    """Every way the doc's rows and the code's metrics disagree, one line each (empty: in sync)."""
    problems = []
    seen: dict[str, DocRow] = {}
    for row in rows:
        if row.name in seen:
            problems.append(f"listed twice: {row.name} (lines {seen[row.name].line} and {row.line})")
        seen[row.name] = row
    for name in sorted(code.keys() - seen.keys()):
        m = code[name]
        problems.append(f"missing from docs/metrics.md: {name} ({m.type}, labels {list(m.labels)}, defined in "
                        f"{m.module}: {m.help!r})")  # fmt: skip
    for name in sorted(seen.keys() - code.keys()):
        problems.append(
            f"stale in docs/metrics.md (line {seen[name].line}): {name} is not exported by the code"
        )
    for name in sorted(seen.keys() & code.keys()):
        row, m = seen[name], code[name]
        if row.type != m.type:
            problems.append(
                f"docs/metrics.md:{row.line}: {name} is a {m.type} in {m.module}, not a {row.type}"
            )
        if sorted(row.labels) != sorted(m.labels):
            problems.append(f"docs/metrics.md:{row.line}: {name} has labels {list(m.labels)} in {m.module}, "
                            f"the doc says {list(row.labels)}")  # fmt: skip
    return problems


def test_the_doc_lists_exactly_the_exported_metrics() -> None:
    code = metrics_catalog.exported()
    problems = differences(doc_rows(DOC.read_text()), code)
    assert not problems, "docs/metrics.md is out of sync with the code:\n  " + "\n  ".join(problems)


def fixed_values() -> dict[tuple[str, str], set[str]]:
    """Label values the code keeps in one constant: the doc must list exactly these."""
    from kvpool.cachenode.client import members
    from kvpool.cachenode.core.holders import Status
    from kvpool.connector import miss_reasons
    from kvpool.operator import metrics as operator_metrics

    return {
        ("kvpool_connector_miss_tokens_total", "reason"): set(miss_reasons.REASONS),
        ("kvpool_operator_reconciles_total", "outcome"): set(operator_metrics.OUTCOMES),
        ("kvpool_lookup_batches_total", "result"): {s.value for s in Status},
        ("kvpool_pool_members", "state"): {members.STARTING, members.READY, members.LEAVING, members.DOWN},
    }


def test_the_doc_lists_the_fixed_label_values() -> None:
    rows = {row.name: row for row in doc_rows(DOC.read_text())}
    wrong = [
        f"docs/metrics.md:{rows[name].line}: {name}{{{label}}}: the code has {sorted(values)}, the doc lists "
        f"{sorted(rows[name].values(label))}"
        for (name, label), values in fixed_values().items()
        if rows[name].values(label) != values
    ]
    assert not wrong, "\n".join(wrong)


def test_the_catalog_finds_every_process_metrics() -> None:
    """The source scan found the modules of every process (so a miss there cannot hide a metric)."""
    modules = set(metrics_catalog.defining_modules())
    assert {
        "kvpool.cachenode.core.metrics",
        "kvpool.cachenode.server.lookup.metrics",
        "kvpool.connector.vllm_metrics",
        "kvpool.operator.webhook.server",
    } <= modules
    code = metrics_catalog.exported()
    assert {m.module for m in code.values()} >= {
        "kvpool.connector.vllm_metrics",
        "kvpool.operator.webhook.server",
    }
    assert code["kvpool_connector_errors_total"].labels == ("model_name", "engine", "kind")
    assert code["kvpool_webhook_admissions_total"].type == "counter"  # named without _total in the code


def test_a_doc_out_of_sync_is_reported() -> None:
    """Each way of drifting is caught and named: a row removed, a row added, a label or type changed."""
    code = metrics_catalog.exported()
    text = DOC.read_text()
    lines = text.splitlines()
    removed = "\n".join(x for x in lines if not x.startswith("| `kvpool_lookup_keys`"))
    assert differences(doc_rows(removed), code) == [
        "missing from docs/metrics.md: kvpool_lookup_keys (gauge, labels [], defined in "
        "kvpool.cachenode.server.lookup.metrics: 'Distinct chunk keys in the index')"
    ]
    added = text + "| `kvpool_no_such_metric_total` | counter | — | node | Made up. |\n"
    (stale,) = differences(doc_rows(added), code)
    assert stale.startswith("stale in docs/metrics.md") and "kvpool_no_such_metric_total" in stale
    relabelled = text.replace(
        "| `kvpool_tier_usage_bytes` | gauge | `tier`:", "| `kvpool_tier_usage_bytes` | gauge | `tierx`:"
    )
    (label,) = differences(doc_rows(relabelled), code)
    assert "kvpool_tier_usage_bytes has labels ['tier']" in label and "['tierx']" in label
    retyped = text.replace("| `kvpool_lookup_entries` | gauge |", "| `kvpool_lookup_entries` | counter |")
    (kind,) = differences(doc_rows(retyped), code)
    assert "kvpool_lookup_entries is a gauge" in kind
