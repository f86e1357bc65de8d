"""`kvpool bench disk` (the disk tier's verify cost and index rebuild) runs end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

KVPOOL = [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "disk", "--records", "50"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KVPOOL, *args], capture_output=True, text=True, timeout=240)


def test_bench_disk_prints_its_table(tmp_path):
    result = _run("--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("value   memcpy  xxh3")
    assert [line.split()[:2] for line in lines[1:3]] == [["4", "MiB"], ["32", "MiB"]]
    assert lines[-1].startswith("index rebuild: 50 records in ")
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_bench_disk_json_contract(tmp_path):
    result = _run("--dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(figures["sizes"]) == ["32MiB", "4MiB"]
    assert figures["sizes"]["4MiB"]["disk_get_bytes_expected"] == 5 * 32 * 4 * 2**20
    for fig in figures["sizes"].values():
        for key in (
            "memcpy_gbps",
            "xxh3_gbps",
            "socket_gbps",
            "disk_get_gbps_verify",
            "disk_get_gbps_no_verify",
        ):
            assert fig[key] > 0, key
        for key in ("verify_cost_vs_memcpy_pct", "verify_cost_vs_socket_get_pct", "verify_cost_disk_get_pct"):
            assert key in fig
        # every baseline moved the bytes it claims
        size = fig["disk_get_bytes_expected"] // (5 * fig["values"])  # 5 rounds
        assert fig["memcpy_bytes_verified"] == size
        assert fig["socket_bytes_received"] == fig["socket_bytes_expected"] == 11 * size
        assert fig["socket_last_value_equal"] is True
        assert (
            fig["disk_get_bytes_verify"] == fig["disk_get_bytes_no_verify"] == fig["disk_get_bytes_expected"]
        )
    assert figures["rebuild"]["records"] == 50 and figures["rebuild"]["rebuild_s"] > 0
