"""The connector's pool (`SafePool` over `UrlPool`, as a vLLM worker holds it) when its `kvpool
agent` process is SIGKILLed in the middle of a transfer: after the agent leased arena ranges and
before the connector copied them.

The kill lands at that exact point through a hook on `AgentClient._region`, which every get and
put calls once the agent has answered with a lease and before any byte is copied. The agent is a
real process and really dies there; the rest of the call runs the real code.
- A get copies from the arena the connector still has mapped. Its bytes are the stored ones,
  because a dead agent reuses no range. The chunk format's checksum would catch anything else in
  the engine.
- A put writes into the old mapping, and its commit fails: nothing is stored, and after the
  restart the key is a miss (nothing uncommitted becomes visible).
- Later calls are misses and dropped writes, never exceptions. After the restart the pool maps
  the new arena, and puts and gets work again.
"""

from __future__ import annotations

import os

import pytest

from kvpool.cachenode.client.agent import AgentClient
from kvpool.connector.backend import SafePool
from kvpool.connector.pools import UrlPool

from .conftest import agent_stats, wait_until

pytestmark = pytest.mark.timeout(300)


def values(prefix: str, n: int, size: int = 256 * 1024) -> dict[bytes, bytes]:
    return {f"{prefix}-{i:04d}".encode().ljust(32, b"."): os.urandom(size + i) for i in range(n)}


def kill_at_the_next_lease(monkeypatch, agent) -> list[str]:
    """SIGKILL `agent` when the next lease it granted is about to be used; returns a list the
    hook appends to, so the test can check the kill happened there."""
    fired: list[str] = []
    real = AgentClient._region

    def region_after_the_kill(self, lease, count):
        if not fired:
            agent.kill()
            fired.append(f"killed after a lease of {count} values")
        return real(self, lease, count)

    monkeypatch.setattr(AgentClient, "_region", region_after_the_kill)
    return fired


def open_safe_pool(url: str) -> SafePool:
    """The connector's pool, with a short breaker pause so the test need not wait 5 s."""
    pool = SafePool(UrlPool(url, timeout=5.0), breaker_s=0.2)
    pool.warm()
    assert pool.pool.name.endswith("shared memory)"), f"the arena is not mapped: {pool.pool.name}"
    return pool


def read(pool: SafePool, keys: list[bytes]) -> dict[bytes, bytes]:
    found = {}
    for key, held in zip(keys, pool.get_many_into(keys), strict=True):
        if held is not None:
            found[key] = bytes(held.view)
            held.release()
    return found


def test_agent_killed_between_a_get_lease_and_the_copy(cluster, monkeypatch) -> None:
    a = cluster.agent("agent-k", "--nixl", "off")
    data, more = values("stored", 4), values("after", 3)
    keys = list(data)
    pool = open_safe_pool(a.url)
    try:
        assert pool.put_many(list(data.items()))
        assert read(pool, keys) == data

        fired = kill_at_the_next_lease(monkeypatch, a)
        got = read(pool, keys)
        assert fired and not a.alive
        assert got == data  # copied from the dead agent's arena, still mapped here: its own bytes
        monkeypatch.undo()

        # the agent is gone: misses and dropped writes, never an exception
        assert read(pool, keys) == {}
        assert pool.lease_prefix(keys, 1000) == (0, 0)
        assert pool.put_many(list(more.items())) is False

        a.start()  # same id and ports, a new arena file (the old one is replaced)
        wait_until(lambda: pool.put_many(list(more.items())), what="a put into the new arena")
        assert read(pool, list(more)) == more  # mapped the new arena
        assert read(pool, keys) == {}  # the old chunks died with the old agent: misses, not wrong bytes
        assert pool.lease_prefix(list(more), 0)[0] == 3
    finally:
        pool.close()
    assert os.listdir(cluster.arena_dir) == ["kvpool-agent-agent-k.arena"]
    stats = agent_stats(a)
    assert stats["agent"]["arena_leases"] == 0 and stats["pinned_bytes"] == 0, stats["agent"]


def test_agent_killed_between_a_put_reservation_and_the_commit(cluster, monkeypatch) -> None:
    a = cluster.agent("agent-k", "--nixl", "off")
    data, more = values("reserved", 3), values("after", 2)
    keys = list(data)
    pool = open_safe_pool(a.url)
    try:
        fired = kill_at_the_next_lease(monkeypatch, a)
        assert pool.put_many(list(data.items())) is False  # the commit found no agent: dropped
        assert fired and not a.alive
        monkeypatch.undo()

        a.start()
        wait_until(lambda: pool.put_many(list(more.items())), what="a put into the new arena")
        assert read(pool, keys) == {}  # the half-done put was never committed: nothing visible
        assert read(pool, list(more)) == more
    finally:
        pool.close()
    stats = agent_stats(a)
    assert stats["tiers"]["memory"]["entries"] == 2, stats["tiers"]
    assert stats["agent"]["arena_leases"] == 0 and stats["pinned_bytes"] == 0, stats["agent"]
