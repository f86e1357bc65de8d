"""`kvpool bench pool --json` runs end to end, its last line carries every figure and ratio, and
both sides' gets (the connector's receive path, no malloc tuning) moved the bytes they claim."""

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
    assert figures["malloc_tuning"] is False and figures["get_path"].startswith("get_many_into")
    # --total 32, one run: one 32 MiB value, or eight of 4 MiB, got through each side
    assert figures["bytes_expected"] == {"4m": 32 * 2**20, "32m": 32 * 2**20}
    assert figures["values_expected"] == {"4m": 8, "32m": 1}
    for side in ("pool", "baseline_single_node"):
        for size in ("4m", "32m"):
            assert figures["bytes_moved"][f"{side}_get_{size}"] == figures["bytes_expected"][size]
            assert figures["values_verified"][f"{side}_get_{size}"] == figures["values_expected"][size]
    assert "run 1/1" in result.stderr  # progress goes to stderr, not stdout
