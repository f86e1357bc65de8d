"""A client process killed mid-transfer on the TCP data channel or a gRPC Put stream (issue 22,
item 5): the node ends the lease when it expires, frees the half-received value's memory, never
shows that value, and serves the next client as before. (The NIXL variant:
tests/nixl/test_nixl_processes.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpool.cachenode import Client

from .conftest import wait_until

DEAD_CLIENT = str(Path(__file__).with_name("dead_client.py"))
MiB = 1 << 20
LEASE_MS = 1500
KEY = b"held-key" + b"." * 24
PARTIAL = b"never-committed" + b"-" * 17


def stats(url: str) -> dict:
    with Client(url, timeout=5) as c:
        return c.stats()


@pytest.mark.parametrize("how", ["data", "grpc"])
def test_a_client_killed_mid_put_leaves_no_pin_no_memory_and_no_value(pool, how):
    node = pool.start(pool.add())
    value = os.urandom(2 * MiB)
    with Client(node.url, timeout=5) as c:
        c.put(KEY, value)
    base = stats(node.url)
    assert base["pinned_bytes"] == 0
    proc = subprocess.Popen(
        [sys.executable, "-P", DEAD_CLIENT, node.url, KEY.decode(), str(LEASE_MS), how],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("held 1 "), proc.stderr.read() if proc.poll() is not None else line
        # the node holds the pin and a reservation for the half-received value
        wait_until(lambda: stats(node.url)["tiers"]["memory"]["arena_used"] > base["tiers"]["memory"]["arena_used"],
                   what="the half-received value's memory")  # fmt: skip
        assert stats(node.url)["pinned_bytes"] == 2 * MiB
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    t0 = time.monotonic()
    wait_until(
        lambda: stats(node.url)["pinned_bytes"] == 0, timeout=LEASE_MS / 1000 + 10, what="the lease's end"
    )
    wait_until(lambda: stats(node.url)["tiers"]["memory"]["arena_used"] == base["tiers"]["memory"]["arena_used"],
               timeout=10, what="the half-received value's memory back")  # fmt: skip
    assert time.monotonic() - t0 < LEASE_MS / 1000 + 10
    after = stats(node.url)
    assert after["leases"] == 0
    assert after["leases_expired"] >= 1  # ended by its expiry: the killed client never released it
    assert after["tiers"]["memory"]["used"] <= after["tiers"]["memory"]["capacity"]
    with Client(node.url, timeout=5) as c:
        assert c.get(PARTIAL) is None  # never committed: never visible
        assert c.get(KEY) == value  # the pinned value is intact
        c.put(PARTIAL, b"x" * 1000)  # and the node takes new work
        assert c.get(PARTIAL) == b"x" * 1000
