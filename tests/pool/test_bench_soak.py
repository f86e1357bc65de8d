"""`kvpool bench soak --minutes 1 --json` (issue 22, item 7, the short form of the 10-minute soak):
three worker processes put, read back and look up values of 4 KiB..4 MiB on `kvpool up --nodes 3`
with 64 MiB per node, far less than the keyspace, so the nodes evict all along. Every value read
is checked whole against its key's value; the figures must be real (bytes moved, a sample per
interval, RSS read from /proc) and the pool must stay within its budget with no error.

The values module's check is shown able to fail (a wrong byte, a short value, another key's
value), so 0 wrong bytes means something."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvpool.cli.bench import soak_report as report
from kvpool.cli.bench.soak_values import MAX_SIZE, MIN_SIZE, Values, wrong_bytes

MINUTES = 1.0
OPS = ("put", "get_many_into", "get", "prefix_hits", "contains", "locate")


def test_values_detect_every_kind_of_wrong_byte():
    values = Values()
    a, b = Values.key(1), Values.key(2)
    va = values.value(a)
    assert values.value(a) == va and len(va) == values.size(a)
    assert wrong_bytes(va, va) == 0
    flipped = bytearray(va)
    flipped[len(va) // 2] ^= 1
    assert wrong_bytes(memoryview(flipped), va) == 1
    assert wrong_bytes(va[:-10], va) == 10
    assert wrong_bytes(values.value(b), va) > 0  # another key's value
    sizes = [values.size(Values.key(i)) for i in range(2000)]
    assert MIN_SIZE <= min(sizes) < 64 * 1024 and 1024 * 1024 < max(sizes) <= MAX_SIZE


def _sample(t: float, rss: int, used: int, capacity: int = 100) -> report.Sample:
    return report.Sample(t, {"a": rss, "b": 1000}, 50, [10], {"a": {"used": used, "capacity": capacity}})


def test_report_goals_can_fail():
    assert report.warmup_seconds(600) == 120 and report.warmup_seconds(60) == 12
    assert report.warmup_seconds(30) == 10 and report.warmup_seconds(15) == 7.5
    # warm-up sample: the first at or after 12 s; end: the last
    samples = [_sample(0, 500, 10), _sample(12, 1000, 90), _sample(30, 1200, 100), _sample(60, 1060, 95)]
    rss = report.rss_figures(samples, 12)
    assert rss["rss_warmup_at_s"] == 12 and rss["rss_per_node"]["a"]["max_after_warmup"] == 1200
    assert rss["rss_per_node"]["a"]["growth_pct"] == 6.0 and rss["rss_growth_pct_nodes"] == 3.0
    usage = report.usage_figures(samples)
    assert usage["usage_within_budget"] and usage["usage_max_ratio"] == 1.0
    figures = {**rss, **usage, "errors": 0, "wrong_values": 0, "wrong_bytes": 0}
    assert report.goals(figures) == {
        "rss_growth_le_5pct": False,  # one node grew 6%, though the nodes together grew 3%
        "usage_le_budget": True,
        "zero_errors": True,
        "zero_wrong_bytes": True,
    }
    over = report.usage_figures([*samples, _sample(61, 1000, 101)])
    assert not over["usage_within_budget"]


@pytest.mark.slow  # a minute of load; the suite's one soak
def test_bench_soak_one_minute():
    result = subprocess.run(
        [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "soak", "--minutes", str(MINUTES),
         "--nodes", "3", "--workers", "3", "--memory", "64MiB", "--interval", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # --json: one object, nothing else
    f = json.loads(lines[0])

    # correctness: nothing failed, nothing wrong
    assert f["errors"] == 0, (f["errors_by_op"], f["error_samples"])
    assert f["wrong_values"] == 0 and f["wrong_bytes"] == 0
    assert f["goals"]["zero_errors"] and f["goals"]["zero_wrong_bytes"]

    # the budget held at every sample of every node, and the load made the nodes evict
    budget = 64 * 2**20
    assert f["budget_per_node_bytes"] == budget
    assert f["usage_within_budget"] and f["goals"]["usage_le_budget"]
    assert 0 < f["usage_max_bytes"] <= budget
    assert f["usage_max_ratio"] > 0.5  # the budget was really filled ...
    assert f["evictions"] > 0  # ... and overflowed
    assert f["pinned_bytes_end"] == 0

    # every operation ran, and the reads moved (and checked) real bytes
    for op in OPS:
        assert f["ops"][op] > 0 and f["ops_per_s"][op] > 0, op
    assert f["bytes"]["put"] >= f["ops"]["put"] * MIN_SIZE  # every put carried a whole value
    for op in ("put", "get_many_into", "get"):
        assert f["bytes"][op] > 0 and f["gbps"][op] > 0, op
    assert f["read_hits"] > 0 and 0 <= f["miss_ratio"] < 1
    assert f["keys_asked"]["locate"] > 0 and f["keys_asked"]["prefix_hits"] > 0

    # the samples are real: about one a second over the load, RSS read from /proc for 3 nodes
    seconds = 60 * MINUTES
    assert seconds <= f["load_seconds"] < seconds + 15  # a step past the deadline finishes
    assert seconds * 0.8 <= f["samples"] <= seconds + 5
    assert f["usage_samples"] == 3 * f["samples"]
    assert 10 <= f["rss_warmup_at_s"] < 20  # warm-up: 20% of 60 s, at least 10 s
    assert set(f["rss_per_node"]) == {"up-0", "up-1", "up-2"}
    for node in f["rss_per_node"].values():
        assert node["warmup"] > 10 * 2**20 and node["end"] > 10 * 2**20
        assert node["max_after_warmup"] >= max(node["warmup"], node["end"])
    # a node's RSS is its arena (the budget) plus the interpreter; a leak of the values moved
    # (gigabytes over the run) would show far above this
    assert f["rss_end_bytes"]["nodes"] < 3 * (budget + 200 * 2**20)
    assert f["rss_warmup_bytes"]["workers"] > 0 and f["rss_warmup_bytes"]["lookup"] > 0
