"""`kvpool bench tiers` end to end on tiny values: its last stdout line is the JSON report."""

from __future__ import annotations

import json

from click.testing import CliRunner

from kvpool.cli.bench.tiers import tiers


def test_bench_tiers_reports_figures_baselines_and_ratios(valkey_server, s3_server):
    bucket = s3_server.new_bucket()
    args = ["--redis-url", valkey_server.url, "--s3-url", f"s3://{bucket}/bench", "--s3-endpoint",
            s3_server.endpoint, "--sizes", "64KiB,1MiB", "--bytes-per-round", "2MiB", "--rounds", "2",
            "--redis-part-size", "256KiB", "--json"]  # fmt: skip
    result = CliRunner().invoke(tiers, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["tiers"]) == {"redis", "s3"}
    for label in ("valkey", "s3"):
        for kind in ("get", "put"):
            ratios = report[f"ratio_{kind}_vs_raw_{label}"]
            assert set(ratios) == {"64.0KiB", "1.0MiB"} and all(r > 0 for r in ratios.values())
    fig = report["tiers"]["redis"]["1.0MiB"]
    assert fig["get"]["median"] > 0 and fig["baseline_raw_valkey_get"]["median"] > 0
    assert fig["get"]["min"] <= fig["get"]["median"] <= fig["get"]["max"]
