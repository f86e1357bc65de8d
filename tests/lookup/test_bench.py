"""`kvpool bench lookup --json` runs end to end (small) and its last line carries every figure."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_lookup_json_contract():
    cmd = [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "lookup", "--keys", "20000",
           "--holders", "8", "--queries", "300", "--runs", "1", "--json"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "lookup_keys_per_s",
        "lookup_p50_ms",
        "lookup_p99_ms",
        "ingest_events_per_s",
        "bytes_per_entry",
        "baseline_dict_keys_per_s",
        "baseline_grpc_noop_keys_per_s",
        "baseline_tcp_noop_keys_per_s",
        "baseline_tcp_noop_p99_ms",
        "lookup_grpc_keys_per_s",
        "lookup_grpc_p99_ms",
        "ratio_lookup_vs_dict",
        "ratio_lookup_vs_grpc_noop",
        "ratio_lookup_vs_tcp_noop",
        "ratio_lookup_vs_grpc",
        "ratio_lookup_grpc_vs_grpc_noop",
    ):
        assert figures[key] > 0, key
    assert figures["entries"] == 20000 and figures["holders"] == 8
    assert figures["transport"].startswith("tcp")
    assert figures["bytes_per_entry"] <= 64  # the table's size, not a timing
    assert "run 1/1" in result.stderr
