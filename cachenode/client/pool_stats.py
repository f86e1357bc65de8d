"""A pool's stats as one cache: per-tier sums over the members that answered. Pure."""

from __future__ import annotations

_SUMMED = ("capacity", "used", "entries", "hits", "misses", "evictions", "arena_used", "corrupt")
_SUMMED_TOP = (
    "pending_writes",
    "pending_write_bytes",
    "dropped_writes",
    "demotions",
    "pinned_bytes",
    "leases",
    "leases_expired",
)


def pool_totals(nodes: dict[str, dict], replicas: int) -> dict:
    """The pool as one cache: per-tier sums over the members that answered."""
    answered = [n for n in nodes.values() if "tiers" in n]
    tiers: dict[str, dict] = {}
    for node in answered:
        for name, tier in node["tiers"].items():
            total = tiers.setdefault(name, {})
            for field in _SUMMED:
                value = tier.get(field)
                if isinstance(value, int | float):
                    total[field] = total.get(field, 0) + value
            total["degraded"] = bool(total.get("degraded")) or bool(tier.get("degraded"))
    versions = {n.get("version") for n in answered}
    out: dict = {
        "ready": bool(answered) and all(n.get("ready") for n in answered),
        "members": len(nodes),
        "members_up": len(answered),
        "replication_factor": replicas,
        "version": versions.pop() if len(versions) == 1 else sorted(map(str, versions)),
        "tiers": tiers,
        "nodes": nodes,
    }
    for field in _SUMMED_TOP:
        out[field] = sum(n.get(field, 0) or 0 for n in answered)
    return out
