"""`kvpool bench tiers` end to end on tiny values: its last stdout line is the JSON report, and
every path (the baselines included) moved the bytes it claims."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cli.bench.moved import Moved
from kvpool.cli.bench.tiers import tiers
from kvpool.cli.bench.tiers_raw import RawValkey

SIZES = {"64.0KiB": 64 * 1024, "1.0MiB": 1024 * 1024}


def test_bench_tiers_reports_figures_baselines_and_ratios(valkey_server, s3_server):
    bucket = s3_server.new_bucket()
    # long timeouts: a loaded machine must not turn the bench's reads into misses
    args = ["--redis-url", valkey_server.url, "--s3-url", f"s3://{bucket}/bench", "--s3-endpoint",
            s3_server.endpoint, "--sizes", "64KiB,1MiB", "--bytes-per-round", "2MiB", "--rounds", "2",
            "--redis-part-size", "256KiB", "--redis-timeout", "30", "--s3-timeout", "30", "--json"]  # fmt: skip
    result = CliRunner().invoke(tiers, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["tiers"]) == {"redis", "s3"}
    for label in ("valkey", "s3"):
        for kind in ("get", "get_batch", "put"):
            ratios = report[f"ratio_{kind}_vs_raw_{label}"]
            assert set(ratios) == set(SIZES) and all(r > 0 for r in ratios.values())
            for size, spread in report[f"spread_ratio_{kind}_vs_raw_{label}"].items():
                assert spread["min"] <= spread["median"] <= spread["max"]  # ratios are per round
                assert abs(ratios[size] - spread["median"]) <= 0.005 + 1e-9
    for name, label in (("redis", "valkey"), ("s3", "s3")):
        for size_name, size in SIZES.items():
            fig = report["tiers"][name][size_name]
            count = max(2, 2 * 1024 * 1024 // size)
            assert fig["baseline_lanes"] == 8  # the tier's default connections / concurrency
            assert fig["bytes_expected"] == 2 * count * size and fig["values_expected"] == 2 * count
            # each path, the baselines included, moved every byte and got every value right
            assert fig["bytes_moved"] == dict.fromkeys(
                ("put", "raw_put", "get", "get_batch", "raw_get"), fig["bytes_expected"]
            )
            assert fig["values_verified"] == dict.fromkeys(("get", "get_batch", "raw_get"), 2 * count)
            assert fig[f"baseline_raw_{label}_get"]["median"] > 0
            assert fig["get"]["min"] <= fig["get"]["median"] <= fig["get"]["max"]


def test_the_raw_valkey_baseline_reads_back_what_it_wrote(valkey_server):
    """Over several connections, each reusing one buffer: the bytes counted and the values' ends
    are those written, and a value that differs is not counted as right."""
    cfg = SharedTiersConfig.from_options(redis_url=valkey_server.url, tier_order="redis").redis
    values = [os.urandom(300_000 + i) for i in range(7)]
    keys = [b"raw-check-%d" % i for i in range(7)]
    raw = RawValkey(cfg, lanes=3, max_size=400_000)
    try:
        assert raw.put_many(list(zip(keys, values, strict=True))) == sum(map(len, values))
        moved = raw.get_many(keys)
        assert moved.nbytes == sum(map(len, values)) and moved.matches(values) == 7
        assert moved.matches([*values[:6], os.urandom(len(values[6]))]) == 6
        raw.delete(keys)
    finally:
        raw.close()
    assert valkey_server.client().exists(*keys) == 0


def test_moved_counts_only_matching_ends():
    got = Moved()
    for v in (b"a" * 40, b"b" * 40):
        got.add(memoryview(v))
    assert got.nbytes == 80 and got.matches([b"a" * 40, b"b" * 39 + b"c"]) == 1
