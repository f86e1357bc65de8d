"""The soak's figures from its samples and its workers' counts. Pure: no I/O.

A sample is what `kvpool bench soak` read at one moment: `t` (seconds since the load began), the
resident set (VmRSS) of every node process, of the `kvpool up` process (which runs the lookup
service) and of every worker, and each node's memory tier as its stats report it. RSS "after
warm-up" is the first sample at or after the warm-up; "at the end" is the last sample, read once
the load has stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WARMUP_SHARE = 0.2
WARMUP_MIN_S = 10.0
RSS_GROWTH_GOAL_PCT = 5.0


def warmup_seconds(seconds: float) -> float:
    """The first 20% of the run, or 10 s if that is longer (never the whole run)."""
    return min(max(WARMUP_SHARE * seconds, WARMUP_MIN_S), 0.5 * seconds)


@dataclass
class Sample:
    t: float
    rss_nodes: dict[str, int]
    rss_lookup: int
    rss_workers: list[int]
    usage: dict[str, dict] = field(default_factory=dict)  # node -> memory tier stats + pinned_bytes

    def group(self, name: str) -> int:
        if name == "nodes":
            return sum(self.rss_nodes.values())
        if name == "lookup":
            return self.rss_lookup
        return sum(self.rss_workers)


def _growth(before: int, after: int) -> float:
    return round(100.0 * (after - before) / before, 2) if before else 0.0


def rss_figures(samples: list[Sample], warmup_s: float) -> dict:
    """RSS after warm-up and at the end, per node and per group, and the growth between."""
    warm = next((s for s in samples if s.t >= warmup_s), samples[-1])
    end = samples[-1]
    after = [s for s in samples if s.t >= warm.t]
    groups = ("nodes", "lookup", "workers")
    per_node = {
        node: {
            "warmup": warm.rss_nodes.get(node, 0),
            "end": rss,
            "max_after_warmup": max(s.rss_nodes.get(node, 0) for s in after),
            "growth_pct": _growth(warm.rss_nodes.get(node, 0), rss),
        }
        for node, rss in sorted(end.rss_nodes.items())
    }
    return {
        "rss_warmup_at_s": round(warm.t, 1),
        "rss_warmup_bytes": {g: warm.group(g) for g in groups},
        "rss_end_bytes": {g: end.group(g) for g in groups},
        "rss_max_after_warmup_bytes": {g: max(s.group(g) for s in after) for g in groups},
        "rss_growth_pct": {g: _growth(warm.group(g), end.group(g)) for g in groups},
        "rss_per_node": per_node,
        "rss_growth_pct_nodes": _growth(warm.group("nodes"), end.group("nodes")),
        "rss_growth_pct_max_node": max((n["growth_pct"] for n in per_node.values()), default=0.0),
    }


def usage_figures(samples: list[Sample]) -> dict:
    """The memory tier's largest use against its budget, over every sample and node."""
    used = [
        (u["used"], u.get("arena_used", u["used"]), u["capacity"]) for s in samples for u in s.usage.values()
    ]
    budget = max((c for _, _, c in used), default=0)
    end = samples[-1].usage
    return {
        "budget_per_node_bytes": budget,
        "usage_max_bytes": max((u for u, _, _ in used), default=0),
        "usage_max_ratio": round(max((u / c for u, _, c in used if c), default=0.0), 4),
        "arena_max_bytes": max((a for _, a, _ in used), default=0),
        "usage_within_budget": all(u <= c for u, _, c in used),
        "usage_samples": len(used),
        "usage_end_bytes": {node: u["used"] for node, u in sorted(end.items())},
        "evictions": sum(u.get("evictions", 0) for u in end.values()),
        "pinned_bytes_end": sum(u.get("pinned_bytes", 0) for u in end.values()),
    }


def load_figures(workers: list[dict], seconds: float) -> dict:
    """The workers' counts summed: ops, ops/s, GB/s and mean latency per operation, reads' hits
    and misses, errors and wrong bytes."""
    names = list(workers[0]["ops"]) if workers else []
    total = {n: {k: sum(w["ops"][n][k] for w in workers) for k in workers[0]["ops"][n]} for n in names}
    reads = [total[n] for n in ("get_many_into", "get") if n in total]
    asked = sum(r["asked"] for r in reads)
    misses = sum(r["misses"] for r in reads)
    return {
        "load_seconds": round(seconds, 2),
        "ops": {n: c["ops"] for n, c in total.items()},
        "ops_per_s": {n: round(c["ops"] / seconds, 1) for n, c in total.items()},
        "bytes": {n: c["bytes"] for n, c in total.items()},
        "gbps": {n: round(c["bytes"] / seconds / 1e9, 4) for n, c in total.items() if c["bytes"]},
        "mean_latency_ms": {n: round(1e3 * c["seconds"] / c["ops"], 3) for n, c in total.items() if c["ops"]},
        "lookup_hits": {n: c["hits"] for n, c in total.items() if n not in ("put", "get_many_into", "get")},
        "keys_asked": {n: c["asked"] for n, c in total.items() if c["asked"]},
        "read_hits": sum(r["hits"] for r in reads),
        "read_misses": misses,
        "miss_ratio": round(misses / asked, 4) if asked else 0.0,
        "errors": sum(c["errors"] for c in total.values()),
        "errors_by_op": {n: c["errors"] for n, c in total.items() if c["errors"]},
        "error_samples": [e for w in workers for e in w["error_samples"]][:10],
        "wrong_values": sum(w["wrong_values"] for w in workers),
        "wrong_bytes": sum(w["wrong_bytes"] for w in workers),
    }


def goals(figures: dict) -> dict:
    """Issue 22's goals for the soak, each true or false."""
    return {
        "rss_growth_le_5pct": figures["rss_growth_pct_nodes"] <= RSS_GROWTH_GOAL_PCT
        and figures["rss_growth_pct_max_node"] <= RSS_GROWTH_GOAL_PCT,
        "usage_le_budget": figures["usage_within_budget"],
        "zero_errors": figures["errors"] == 0,
        "zero_wrong_bytes": figures["wrong_bytes"] == 0 and figures["wrong_values"] == 0,
    }
