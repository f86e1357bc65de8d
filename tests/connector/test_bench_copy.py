"""`kvpool bench copy --json` runs end to end and its last line carries every figure and ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..needs import csrc_extension

BENCH = [sys.executable, "-m", "kvpool.cli.main", "bench", "copy", "--runs", "1", "--repeat", "1"]


@csrc_extension()
@pytest.mark.parametrize("layout", ["auto", "mla"])
def test_bench_copy_json_contract(layout):
    result = subprocess.run(
        [*BENCH, "--layers", "2", "--tokens", "200", "--layout", layout, "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "gather_gbps",
        "scatter_gbps",
        "torch_gather_gbps",
        "torch_scatter_gbps",
        "baseline_memcpy_gbps",
        "ratio_gather_vs_memcpy",
        "ratio_scatter_vs_memcpy",
        "ratio_gather_vs_torch",
        "ratio_scatter_vs_torch",
    ):
        assert figures[key] > 0, key
        assert figures[f"spread_{key}"]["min"] <= figures[key] <= figures[f"spread_{key}"]["max"]
    assert figures["cpu_layout"] == ("cpu" if layout == "auto" else "mla")
    assert figures["mib_per_call"] > 0
    # the memcpy baseline moved its bytes: its destination, cleared first, equals the source after
    assert figures["bytes_expected"] == figures["bytes_per_call"] > 0  # one run
    assert figures["bytes_verified"]["baseline_memcpy_gbps"] == figures["bytes_expected"]
    if os.environ.get("KVPOOL_REQUIRE_CUDA") == "1":  # scripts/gpu-check.sh: the GPU figures must run
        assert not figures["gpu"].startswith("skipped"), figures["gpu"]
    if figures["gpu"].startswith("skipped"):
        assert "ratio_load_vs_h2d" not in figures
    else:
        assert figures["ratio_load_vs_h2d"] > 0 and figures["ratio_save_vs_d2h"] > 0
        for key in ("baseline_h2d_gbps", "baseline_d2h_gbps"):
            assert figures["bytes_verified"][key] == figures["bytes_expected_gpu"] > 0, key
    assert "run 1/1" in result.stderr  # progress goes to stderr, not stdout


def test_bench_copy_needs_the_extension():
    code = (
        "import sys; sys.modules['kvpool.connector._kvcopy'] = None\n"
        "from kvpool.cli.main import main\n"
        "main(['bench', 'copy', '--runs', '1', '--json'])\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "kvpool: error: KV copy extension unavailable: not built" in result.stderr
