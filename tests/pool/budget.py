"""What issue 22 item 5 asks of every node left standing after a fault: nothing pinned, no lease
left, and every local tier within its byte budget, read from each node's own stats (no routing).

Pins end when the client releases them (a NIXL transfer's notification, a `release` call), or by
expiry after the lease TTL (30 s by default). The check waits for 0 pinned bytes as a barrier on
that observable state (its limit, past the TTL, only guards against a hang), then asserts that no
lease ended by expiry: a release that was lost fails the check even though expiry freed the pin."""

from __future__ import annotations

import time
from collections.abc import Iterable

from .conftest import Node

PIN_WAIT_S = 45.0  # past the 30 s default lease TTL: a guard against a hang, not a timing claim


def node_stats(node: Node) -> dict:
    conn = node.connection()
    try:
        return conn.stats()
    finally:
        conn.close()


def assert_unpinned_and_within_budget(nodes: Iterable[Node], *, leases_expired: int | None = 0) -> dict:
    """Wait until each node reports 0 pinned bytes and 0 leases, then assert that every local
    tier's use is within its capacity and (unless None) that at most `leases_expired` leases
    ended by expiry rather than by a release. Returns the stats by node id."""
    nodes = [n for n in nodes if n.alive]
    assert nodes, "no node left standing to check"
    deadline = time.monotonic() + PIN_WAIT_S
    while True:
        stats = {n.node_id: node_stats(n) for n in nodes}
        if all(s["pinned_bytes"] == 0 and s["leases"] == 0 for s in stats.values()):
            break
        if time.monotonic() >= deadline:
            pins = {n: (s["pinned_bytes"], s["leases"]) for n, s in stats.items()}
            raise AssertionError(f"pinned bytes / leases not back to 0 within {PIN_WAIT_S} s: {pins}")
        time.sleep(0.1)
    for node_id, s in stats.items():
        for tier, t in s["tiers"].items():
            if t.get("capacity") is not None:  # shared tiers report no size
                assert t["used"] <= t["capacity"], f"{node_id} {tier}: {t['used']} > {t['capacity']}"
        if leases_expired is not None:
            assert s["leases_expired"] <= leases_expired, (node_id, s["leases_expired"])
    return stats
