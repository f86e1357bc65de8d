"""What the store reports for each tier in its stats(): the node's /stats and `kvpool stats`."""

from __future__ import annotations

import logging

from kvpool.cachenode.server.tiers.shared import PolicyTier, SharedTier

log = logging.getLogger(__name__)


def local_tier_stats(tier, hits: int, misses: int, **extra) -> dict:
    """L1 or L2: its budget and use, the store's hit counts, then `extra` (degraded, ...)."""
    return {
        "capacity": tier.capacity,
        "used": tier.usage,
        "entries": len(tier),
        "hits": hits,
        "misses": misses,
        "evictions": tier.evictions,
        **extra,
    }


def shared_tier_stats(tier: SharedTier, hits: int, misses: int, *, write_back: bool) -> dict:
    """The store's hit counts plus what the tier reports (breaker, queue depth, written,
    dropped); degraded means its breaker is not closed. Sizes are unknown (None)."""
    entry: dict = {"capacity": None, "used": None, "entries": None, "evictions": None, "degraded": None}
    if isinstance(tier, PolicyTier):
        entry["write"] = "back" if write_back else "through"
        entry["promote"] = bool(tier.promote_on_read)
    stats = getattr(tier, "stats", None)
    if callable(stats):
        try:
            entry.update(stats())
        except Exception:
            log.exception("Shared tier %s failed to report stats", tier.name)
    if "breaker" in entry:
        entry["degraded"] = entry["breaker"] != "closed"
    entry["hits"] = hits
    entry["misses"] = misses
    return entry
