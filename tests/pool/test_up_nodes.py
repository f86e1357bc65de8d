"""`kvpool up --nodes 3`: three node processes behind one printed URL, and `kvpool status`
showing every node; stopping `up` stops every node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up

from .conftest import values, wait_until


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_up_with_three_nodes_behind_one_url(tmp_path):
    data = values("up", 90)
    disk = tmp_path / "disk"
    with kvpool_up("--nodes", "3", "--memory", "64MiB", "--disk-dir", str(disk), "--disk-size", "64MiB") as (
        proc,
        url,
    ):
        nodes = _children(proc.pid)
        assert len(nodes) == 3
        with Client(url) as client:
            members = client.members()
            assert [m["node_id"] for m in members] == ["up-0", "up-1", "up-2"]
            assert {m["state"] for m in members} == {"ready"}
            assert url == members[0]["url"]  # the printed URL is node 0's
            client.put_many(data)
            assert client.get_many(list(data)) == data
            assert client.get(b"not-there") is None
            stats = client.stats()
            entries = {n: s["tiers"]["memory"]["entries"] for n, s in stats["nodes"].items()}
            assert sum(entries.values()) == len(data) and all(entries.values()), entries
        assert sorted(p.name for p in disk.iterdir()) == ["node-0", "node-1", "node-2"]  # a disk each
        run = [sys.executable, "-P", "-m", "kvpool.cli.main", "status", "--url", url]
        table = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        assert "3 of 3 nodes answering" in table.stdout
        for node_id in ("up-0", "up-1", "up-2"):
            line = next(line for line in table.stdout.splitlines() if node_id in line)
            assert "ready" in line and "64.0 MiB" in line
        raw = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60).stdout)
        assert raw["members"] == 3 and raw["tiers"]["memory"]["entries"] == len(data)
        assert raw["tiers"]["memory"]["hits"] == len(data) and raw["tiers"]["memory"]["misses"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    wait_until(lambda: not any(_alive(pid) for pid in nodes), what="every node stopped")


def test_up_nodes_rejects_bad_flags_before_starting_anything():
    result = subprocess.run(
        [sys.executable, "-P", "-m", "kvpool.cli.main", "up", "--nodes", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KVPOOL_PORT": "0"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("kvpool: error:") and "--nodes" in result.stderr
