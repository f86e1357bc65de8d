"""`kvpool bench node --transport nixl --json` runs end to end with every figure and ratio."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import nixl_or_skip

BENCH = [sys.executable, "-m", "kvpool.cli.main", "bench", "node", "--transport", "nixl"]


def test_bench_node_nixl_json_contract():
    nixl_or_skip()
    result = subprocess.run(
        [*BENCH, "--runs", "1", "--total", "64", "--no-malloc-tuning", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "get_gbps",
        "put_gbps",
        "baseline_raw_nixl_gbps",
        "baseline_tcp_channel_gbps",
        "baseline_tcp_channel_put_gbps",
        "ratio_get_vs_raw_nixl",
        "ratio_get_vs_tcp_channel",
        "ratio_put_vs_tcp_channel",
    ):
        assert figures[key] > 0, key
    assert figures["path"].startswith("nixl over shared memory") and figures["chunks_per_request"] == 2
    assert figures["node_pinned_bytes_after"] == 0 and figures["malloc_tuning"] is False
    # --total 64: two 32 MiB chunks per request; each get path, the raw READ included, moved them
    assert figures["bytes_expected"] == 64 * 2**20 and figures["values_expected"] == 2
    for key in ("get_gbps", "baseline_raw_nixl_gbps", "baseline_tcp_channel_gbps"):
        assert figures["bytes_moved"][key] == 64 * 2**20, key
        assert figures["values_verified"][key] == 2, key
    assert "run 1/1" in result.stderr
