"""`kvpool bench p2p --json` runs end to end (small), its last line carries every figure, and
each side moved the bytes it claims."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys


def test_bench_p2p_json_contract() -> None:
    cmd = [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "p2p", "--runs", "1", "--total", "8",
           "--chunk", "1", "--batch", "4", "--json"]  # fmt: skip
    # its own session: if the bench dies, the agents and node it started (which share its stderr)
    # are ended with it instead of holding the pipe open until the timeout
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        proc.wait(timeout=240)  # its output is a few lines: no pipe fills up meanwhile
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=30)
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-3000:]}"
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("p2p_fetch_gbps", "baseline_node_fetch_gbps", "arena_read_gbps", "ratio_p2p_vs_node"):
        assert figures[key] > 0, key
        assert figures[f"spread_{key}"]["min"] <= figures[key] <= figures[f"spread_{key}"]["max"], key
    assert figures["mib_per_side_per_run"] == 8 and figures["chunk_mib"] == 1
    assert figures["malloc_tuning"] is False
    # every side, the node baseline included, got all 8 chunks of 1 MiB, each equal to the value put
    assert figures["bytes_expected"] == 8 * 2**20 and figures["values_expected"] == 8
    for key in ("p2p_fetch_gbps", "baseline_node_fetch_gbps", "arena_read_gbps"):
        assert figures["bytes_moved"][key] == 8 * 2**20, key
        assert figures["values_verified"][key] == 8, key
    assert "run 1/1" in result.stderr
