"""A pool's hit ratio and memory usage for its status (`kubectl get kvp`), from its nodes' /metrics.

Pure: `parse` reads one node's Prometheus text, `aggregate` turns the nodes' figures into status
fields, and `handoffs` says which chunks nodes handed over between two reads. The reads themselves
are `scrape`'s job. The metric names are the node's (`kvpool.cachenode.core.metrics`; a test keeps
them in step) but not imported: importing them would register the node's metrics in the operator.

Figures are the nodes' counters since each node started: the hit ratio is keys found over keys
asked for (`get`, `get_many`, `prefix_hits`), summed over the nodes that answered. Status strings
are rounded (whole percent, two significant digits of a size) so that a pool under steady traffic
rewrites its status only when a shown figure changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

REQUESTED_KEYS = "kvpool_node_requested_keys_total"
HIT_KEYS = "kvpool_node_hit_keys_total"
TIER_USAGE = "kvpool_tier_usage_bytes"
TIER_CAPACITY = "kvpool_tier_capacity_bytes"
HANDOFF_CHUNKS = "kvpool_handoff_chunks_total"
MEMORY_TIER = "memory"

UNKNOWN = "unknown"
"""Status value when no node's figures could be read."""
NO_LOOKUPS = "n/a"
"""Hit ratio of a pool whose nodes have not been asked for any key yet."""


@dataclasses.dataclass(frozen=True)
class NodeStats:
    """The figures of one node the status needs."""

    requested_keys: float = 0.0
    hit_keys: float = 0.0
    memory_used: float = 0.0
    memory_capacity: float = 0.0
    handoff: Mapping[tuple[str, str], float] = dataclasses.field(default_factory=dict)
    """Chunks handed to new owners by (reason, result): ('leave' | 'rebalance', 'pushed' | ...)."""


def parse(text: str) -> NodeStats:
    """One node's figures from its /metrics text. Raises ValueError on text that is not Prometheus'."""
    values: dict[str, float] = {}
    handoff: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (REQUESTED_KEYS, HIT_KEYS):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
            elif sample.name in (TIER_USAGE, TIER_CAPACITY) and sample.labels.get("tier") == MEMORY_TIER:
                values[sample.name] = sample.value
            elif sample.name == HANDOFF_CHUNKS:
                key = (sample.labels.get("reason", ""), sample.labels.get("result", ""))
                handoff[key] = handoff.get(key, 0.0) + sample.value
    return NodeStats(
        requested_keys=values.get(REQUESTED_KEYS, 0.0),
        hit_keys=values.get(HIT_KEYS, 0.0),
        memory_used=values.get(TIER_USAGE, 0.0),
        memory_capacity=values.get(TIER_CAPACITY, 0.0),
        handoff=handoff,
    )


_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi")


def human_size(n: float) -> str:
    """`n` bytes in binary units with two significant digits at most: 0, 900, 1.2Gi, 12Gi, 120Gi."""
    if n < 1024:
        return str(int(n))
    unit = ""
    for unit in _UNITS:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            break
    text = f"{n:.1f}" if n < 10 else f"{n:.0f}"
    return text.removesuffix(".0") + unit


def hit_ratio(hits: float, lookups: float) -> str:
    """Whole percent, never rounded up to 100% while some key missed (nor down to 0% with a hit)."""
    if lookups <= 0:
        return NO_LOOKUPS
    percent = round(100 * hits / lookups)
    if percent == 100 and hits < lookups:
        percent = 99
    elif percent == 0 and hits > 0:
        percent = 1
    return f"{percent}%"


def aggregate(nodes: Sequence[NodeStats | None]) -> dict[str, Any]:
    """The status fields from every node's figures (None: that node did not answer).

    `hitRatio` ("83%", "n/a" before any lookup), `usage` (memory tier used/budget over the nodes
    that answered, "1.2Gi/12Gi"), `nodesReporting` (how many answered): "unknown" when none did."""
    answered = [n for n in nodes if n is not None]
    if not answered:
        return {"hitRatio": UNKNOWN, "usage": UNKNOWN, "nodesReporting": 0}
    hits = sum(n.hit_keys for n in answered)
    lookups = sum(n.requested_keys for n in answered)
    used = sum(n.memory_used for n in answered)
    capacity = sum(n.memory_capacity for n in answered)
    return {
        "hitRatio": hit_ratio(hits, lookups),
        "usage": f"{human_size(used)}/{human_size(capacity)}",
        "nodesReporting": len(answered),
    }


def handoffs(
    before: Mapping[str, NodeStats], after: Mapping[str, NodeStats]
) -> list[tuple[str, str, dict[str, int]]]:
    """Handoffs between two reads: (node, reason, {result: chunks}) for each node whose handoff
    counters grew. A node absent from `before`, or whose counters went down (it restarted), has no
    baseline and reports nothing."""
    out = []
    for node, now in sorted(after.items()):
        old = before.get(node)
        if old is None or any(now.handoff.get(k, 0.0) < v for k, v in old.handoff.items()):
            continue
        grown: dict[str, dict[str, int]] = {}
        for (reason, result), value in sorted(now.handoff.items()):
            delta = int(value - old.handoff.get((reason, result), 0.0))
            if delta > 0:
                grown.setdefault(reason, {})[result] = delta
        out.extend((node, reason, results) for reason, results in sorted(grown.items()))
    return out
