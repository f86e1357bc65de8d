"""Real processes: an acknowledged value survives SIGKILL (after ~1 s) and SIGTERM (at once)."""

from __future__ import annotations

import os
import time

from .conftest import run_node

SIZES = [1024, 10_000, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024 + 3, 9 * 1024 * 1024]


def test_values_acknowledged_a_second_before_sigkill_survive(tmp_path):
    disk = ["--disk-dir", str(tmp_path / "l2"), "--disk-size", "256MiB"]
    values = {f"persist-{i}-{size}".encode(): os.urandom(size) for i, size in enumerate(SIZES * 3)}
    with run_node(*disk) as node:
        with node.client() as client:
            client.put_many(values)
        time.sleep(1.5)
        node.kill()
    with run_node(*disk) as node, node.client() as client:
        got = client.get_many(list(values))
        assert set(got) == set(values)
        for key, value in values.items():
            assert got[key] == value, key
        stats = client.stats()["tiers"]["disk"]
        assert stats["entries"] == len(values)
        assert stats.get("corrupt", 0) == 0


def test_sigterm_flushes_pending_writes(tmp_path):
    disk = ["--disk-dir", str(tmp_path / "l2"), "--disk-size", "256MiB"]
    values = {f"term-{i}".encode(): os.urandom(2 * 1024 * 1024) for i in range(20)}
    with run_node(*disk) as node:
        with node.client() as client:
            client.put_many(values)
        node.proc.terminate()  # right away: the pending disk writes must be flushed on the way out
        assert node.proc.wait(timeout=30) == 0
    with run_node(*disk) as node, node.client() as client:
        assert client.get_many(list(values)) == values


def test_overwrite_and_delete_survive_restart(tmp_path):
    disk = ["--disk-dir", str(tmp_path / "l2"), "--disk-size", "64MiB"]
    with run_node(*disk) as node:
        with node.client() as client:
            client.put(b"over", b"old" * 1000)
            client.put(b"over", b"new" * 1000)
            client.put(b"gone", b"x" * 1000)
            client.delete([b"gone"])
            deadline = time.monotonic() + 20  # ordering is under test here, not the disk's speed
            while client.stats()["pending_writes"] and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(0.2)
        node.kill()
    with run_node(*disk) as node, node.client() as client:
        assert client.get(b"over") == b"new" * 1000
        assert client.get(b"gone") is None
