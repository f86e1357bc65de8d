"""`kvpool bench pool --json` runs end to end and its last line carries every figure and ratio."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_pool_json_contract():
    result = subprocess.run(
        [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "pool", "--nodes", "3", "--runs", "1",
         "--total", "32", "--prefix-calls", "100", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["nodes"] == 3
    for size in ("4m", "32m"):
        for key in ("pool_get_gbps", "pool_put_gbps", "baseline_single_node_get_gbps",
                    "baseline_single_node_put_gbps", "ratio_pool_get_vs_single_node",
                    "ratio_pool_put_vs_single_node"):  # fmt: skip
            assert figures[f"{key}_{size}"] > 0, key
    for key in ("pool_prefix_p50_us", "pool_prefix_p99_us", "baseline_single_node_prefix_p99_us",
                "ratio_pool_prefix_p99_vs_single_node", "ratio_pool_get_vs_single_node"):  # fmt: skip
        assert figures[key] > 0, key
    assert figures["pool_prefix_p99_us"] >= figures["pool_prefix_p50_us"]
    assert "run 1/1" in result.stderr  # progress goes to stderr, not stdout
