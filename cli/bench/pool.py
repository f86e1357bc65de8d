"""`kvpool bench pool`: what routing over a pool of nodes costs, beside one node reached directly.

Same run, same Client class, same values: get/put GB/s (one value per call, as `bench node`: the
get is the connector's `get_many_into`, each pooled receive buffer released once read, and no
malloc tuning) and the latency of `prefix_hits` over 128 stored keys, through a `kvpool up
--nodes N` pool and through a single `kvpool up` node. The two sides take turns in blocks of a few
values, the side that leads alternating (call by call for `prefix_hits`), so a busy machine slows
both alike; each ratio pairs one run's pool figure with the same run's single-node figure before
the median over runs is taken. Each side's gets count the bytes they received and the ends of
every value, reported beside what was expected.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import click

from ..options import option
from .moved import Moved
from .node import MiB, _progress, _spread

SIZES = {"4m": 4 * MiB, "32m": 32 * MiB}
PREFIX_KEYS = 128
BLOCK_BYTES = 32 * MiB  # one side's turn: this many bytes, then the other side's


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _throughput(sides: dict, value: bytes, count: int) -> tuple[dict[str, float], dict[str, Moved]]:
    """put then get of `count` values per side, the sides taking turns block by block (the side
    that leads alternating). Gets are the connector's: `get_many_into`, the buffer read, then
    released. Returns GB/s per side and op, and what each side's gets moved."""
    size = len(value)
    per_block = max(1, BLOCK_BYTES // size)
    keys = [f"bench-pool-{size}-{i}".encode() for i in range(count)]
    blocks = [keys[i : i + per_block] for i in range(0, count, per_block)]
    figures: dict[str, float] = {}
    moved = {side: Moved() for side in sides}
    for op in ("put", "get"):
        seconds = dict.fromkeys(sides, 0.0)
        for b, block in enumerate(blocks):
            for side in list(sides) if b % 2 == 0 else list(reversed(sides)):
                client = sides[side]
                started = time.perf_counter()
                if op == "put":
                    for key in block:
                        client.put(key, value)
                else:
                    for key in block:
                        with client.get_many_into([key])[key] as buf:
                            moved[side].add(buf.view)
                seconds[side] += time.perf_counter() - started
        for side, spent in seconds.items():
            figures[f"{side}_{op}_gbps"] = count * size / spent / 1e9
    for side, client in sides.items():  # two values whole, outside the timed passes
        for key in (keys[0], keys[-1]):
            with client.get_many_into([key])[key] as buf:
                if buf.view != value:
                    raise click.ClickException(f"{side} returned bytes that differ from what was put")
    return figures, moved


def _prefix_latency(sides: dict, keys: list[bytes], calls: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {side: [] for side in sides}
    for call in range(calls):
        for side in list(sides) if call % 2 == 0 else list(reversed(sides)):
            started = time.perf_counter()
            hits = sides[side].prefix_hits(keys)
            samples[side].append((time.perf_counter() - started) * 1e6)
            if hits != len(keys):
                raise click.ClickException(f"{side}: prefix_hits found {hits} of {len(keys)} stored keys")
    figures = {}
    for side, values in samples.items():
        figures[f"{side}_prefix_p50_us"] = statistics.median(values)
        figures[f"{side}_prefix_p99_us"] = _percentile(values, 0.99)
    return figures


@click.command("pool")
@option("--nodes", type=click.IntRange(2, 16), default=3, help="Nodes in the pool (kvpool up --nodes N).")
@option("--runs", type=click.IntRange(1, 100), default=5, help="Repetitions; medians are reported.")
@option("--total", default=256, type=click.IntRange(32, 4096), help="MiB moved per size per run.")
@option("--prefix-calls", default=1000, type=click.IntRange(100, 100_000), help="prefix_hits calls per run.")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of figures.")
def pool(nodes: int, runs: int, total: int, prefix_calls: int, as_json: bool) -> None:
    """Pool get/put GB/s and 128-key prefix_hits latency beside one node reached directly."""
    from kvpool.cachenode import Client
    from kvpool.cli.devtools.local_servers import kvpool_up

    payloads = {name: os.urandom(size) for name, size in SIZES.items()}
    prefix_keys = [os.urandom(32) for _ in range(PREFIX_KEYS)]
    memory = f"{2 * total + 64}MiB"
    samples: dict[str, list[float]] = {}
    bytes_moved: dict[str, int] = {}  # side_size -> bytes its counted gets received
    verified: dict[str, int] = {}  # side_size -> values whose ends were the value's
    expected: dict[str, int] = {}  # size -> bytes each side's gets should have received
    expected_values: dict[str, int] = {}
    with (
        kvpool_up("--nodes", str(nodes), "--memory", memory) as (_, pool_url),
        kvpool_up("--memory", memory) as (_, single_url),
        Client(pool_url, transport="grpc") as pooled,
        Client(single_url, transport="grpc") as single,
    ):
        members = len(pooled.members())
        if members != nodes:
            raise click.ClickException(f"the pool has {members} members, expected {nodes}")
        _progress(f"pool {pool_url} ({nodes} nodes), single node {single_url}; {runs} runs")
        sides = {"pool": pooled, "single": single}
        for client in sides.values():
            client.put_many({k: b"p" * 1024 for k in prefix_keys})
        for run in range(-1, runs):  # run -1 warms connections, heaps and caches; not counted
            figures: dict[str, float] = {}
            for name, size in SIZES.items():
                count = max(1, total * MiB // size)
                got, moved = _throughput(sides, payloads[name], count)
                for metric, value in got.items():
                    figures[f"{metric}_{name}"] = value
                if run >= 0:
                    for side, m in moved.items():
                        label = f"{'pool' if side == 'pool' else 'baseline_single_node'}_get_{name}"
                        bytes_moved[label] = bytes_moved.get(label, 0) + m.nbytes
                        verified[label] = verified.get(label, 0) + m.matches([payloads[name]] * count)
                    expected[name] = expected.get(name, 0) + count * size
                    expected_values[name] = expected_values.get(name, 0) + count
            figures.update(_prefix_latency(sides, prefix_keys, prefix_calls))
            if run >= 0:
                for metric, value in figures.items():
                    samples.setdefault(metric, []).append(value)
                _progress(
                    f"run {run + 1}/{runs}: "
                    + ", ".join(f"{k}={v[-1]:.2f}" for k, v in sorted(samples.items()))
                )
    result: dict = {
        "nodes": nodes,
        "runs": runs,
        "mib_per_run": total,
        "prefix_keys": PREFIX_KEYS,
        "get_path": "get_many_into, buffer released after reading",
        "malloc_tuning": False,
        "bytes_expected": expected,
        "bytes_moved": bytes_moved,
        "values_expected": expected_values,
        "values_verified": verified,
    }
    for key, values in sorted(samples.items()):
        side, _, metric = key.partition("_")
        label = f"pool_{metric}" if side == "pool" else f"baseline_single_node_{metric}"
        result[label] = round(statistics.median(values), 3)
        result[f"spread_{label}"] = _spread(values)
    ratios = {f"ratio_pool_{op}_vs_single_node_{s}": f"{op}_gbps_{s}" for op in ("get", "put") for s in SIZES}
    ratios["ratio_pool_prefix_p99_vs_single_node"] = "prefix_p99_us"
    ratios["ratio_pool_prefix_p50_vs_single_node"] = "prefix_p50_us"
    for ratio, metric in ratios.items():
        per_run = [a / b for a, b in zip(samples[f"pool_{metric}"], samples[f"single_{metric}"], strict=True)]
        result[ratio] = round(statistics.median(per_run), 3)
        result[f"spread_{ratio}"] = _spread(per_run)
    # the headline ratio: reads of the size a 256-token chunk of a small model has (4 MiB)
    result["ratio_pool_get_vs_single_node"] = result["ratio_pool_get_vs_single_node_4m"]
    result["spread_ratio_pool_get_vs_single_node"] = result["spread_ratio_pool_get_vs_single_node_4m"]
    if not as_json:
        for s in SIZES:
            click.echo(
                f"{s}: get pool {result[f'pool_get_gbps_{s}']:.2f} GB/s vs one node "
                f"{result[f'baseline_single_node_get_gbps_{s}']:.2f} (x{result[f'ratio_pool_get_vs_single_node_{s}']:.2f}) | "
                f"put {result[f'pool_put_gbps_{s}']:.2f} vs {result[f'baseline_single_node_put_gbps_{s}']:.2f} "
                f"(x{result[f'ratio_pool_put_vs_single_node_{s}']:.2f})"
            )
        click.echo(
            f"prefix_hits({PREFIX_KEYS}) p50/p99: pool {result['pool_prefix_p50_us']:.0f}/{result['pool_prefix_p99_us']:.0f} us, "
            f"one node {result['baseline_single_node_prefix_p50_us']:.0f}/{result['baseline_single_node_prefix_p99_us']:.0f} us "
            f"(p99 x{result['ratio_pool_prefix_p99_vs_single_node']:.2f})"
        )
    click.echo(json.dumps(result))
