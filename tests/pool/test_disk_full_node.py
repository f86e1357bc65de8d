"""The disk filling up under a `kvpool node` process (issue 22, item 5): a real 1 MiB tmpfs as
the node's disk tier, and puts far beyond it. The node stays up, every get is its value's own
bytes or a miss, memory stays within its budget, the disk tier reports itself degraded, and
nothing is pinned afterwards."""

from __future__ import annotations

import os
import urllib.request

from kvpool.cachenode import Client

KiB = 1 << 10


def metric(http_port: int, name: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_full_disk_degrades_the_disk_tier_and_loses_no_byte(pool, tiny_tmpfs):
    node = pool.add()
    node.disk_dir = None  # the pool's own disk size would not fit: this node's disk is the tmpfs
    pool.start(node, "--memory", "4MiB", "--disk-dir", str(tiny_tmpfs), "--disk-size", "10MiB")
    pool.wait_members(1)
    values = {f"full-{i}".encode().ljust(32, b"."): os.urandom(200 * KiB + i) for i in range(50)}
    with Client(node.url, timeout=5) as client:
        for key, value in values.items():  # 10 MiB through 4 MiB of memory onto a 1 MiB disk
            client.put(key, value)
        got = client.get_many(list(values))
        assert got, "nothing at all was kept"
        assert all(got[k] == values[k] for k in got), "a value came back with other bytes"
        assert len(got) < len(values)  # the disk really was too small: some were dropped
        stats = client.stats()
    assert node.alive
    memory = stats["tiers"]["memory"]
    assert memory["used"] <= memory["capacity"] == 4 << 20
    assert stats["pinned_bytes"] == 0
    assert metric(node.http_port, 'kvpool_tier_degraded{tier="disk"}') == 1.0
