"""Ports for throwaway servers: picks made before any server binds must never collide (CI lost a
pool test to two nodes handed the same port)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from kvpool.cli.devtools.local_servers import free_port

# A fresh band each run, below the test workers' bands, since a reservation outlives the test.
BASE = random.randrange(10_000, 19_800, 200)


def test_picks_in_one_process_never_repeat_within_a_band(monkeypatch):
    monkeypatch.setenv("KVPOOL_PORT_RANGE", f"{BASE}-{BASE + 39}")  # 40: random picks would repeat
    ports = [free_port() for _ in range(30)]
    assert len(set(ports)) == 30
    assert all(BASE <= p < BASE + 40 for p in ports)


def test_a_child_process_does_not_pick_a_port_its_parent_holds_unbound(monkeypatch):
    monkeypatch.setenv("KVPOOL_PORT_RANGE", f"{BASE + 100}-{BASE + 119}")
    mine = {free_port() for _ in range(15)}
    code = "from kvpool.cli.devtools.local_servers import free_port; print(*[free_port() for _ in range(5)])"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True, env=os.environ.copy()).stdout  # fmt: skip
    theirs = {int(p) for p in out.split()}
    assert len(theirs) == 5 and not theirs & mine


def test_without_a_band_ports_are_distinct_and_below_the_ephemeral_range(monkeypatch):
    monkeypatch.delenv("KVPOOL_PORT_RANGE", raising=False)
    ports = [free_port() for _ in range(20)]
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert len(set(ports)) == 20 and all(10_000 <= p < low for p in ports)
