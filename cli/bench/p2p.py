"""`kvpool bench p2p`: an agent fetching chunks from a peer agent, beside fetching the same
amount from a cache node.

Same run, same agent (B), same chunk size and batch: B misses every key, so each `get_many` makes
B fetch the chunks into its arena and the bench copy them out of it (through the shared-memory
arena, as a connector in B's pod does). The peer side's chunks were put into agent A (found
through the lookup service); the node side's into the cache node behind B's `--pool-url`
(`kvpool up`, which runs the lookup service too). The sides take turns batch by batch, so a busy
machine slows both alike; each ratio pairs one run's figures before the median over runs. Also
reported: B reading chunks it already holds (its arena alone), the ceiling of both sides.

The reads are the connector's path to an agent (`AgentClient.get_many`, which `connector.pools.
AgentPool` calls: each value copied out of the arena into new bytes; the agent client has no
pooled-buffer read), and the bench tunes no malloc. Each side counts the bytes it got and the
values equal to the value put, reported beside what was expected.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import click

from ..options import option
from .node import MiB, _progress, _spread

SIDES = ("peer", "node", "arena")


def _wait_indexed(lookup, keys: list[bytes], holder: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        located = lookup.locate(keys)
        if located.prefix == len(keys) and any(m.info.holder_id == holder for m in located.holders):
            return
        time.sleep(0.05)
    raise click.ClickException(f"the lookup service does not list {holder} for the chunks after {timeout} s")


def _one_run(a, b, node, lookup, run: int, value: bytes, count: int, batch: int) -> tuple[dict, dict, dict]:
    size = len(value)
    keys = {
        side: [f"bench-p2p-{side}-{run + 1:03d}-{i:06d}".encode() for i in range(count)]
        for side in ("peer", "node")
    }
    a.put_many((k, value) for k in keys["peer"])
    node.put_many({k: value for k in keys["node"]})
    _wait_indexed(lookup, keys["peer"], "bench-a")
    before = b.stats()["agent"]["sources"]["fetched"]
    keys["arena"] = keys["peer"]  # read again once B holds them
    seconds = dict.fromkeys(SIDES, 0.0)
    moved = dict.fromkeys(SIDES, 0)  # bytes each side's gets returned
    right = dict.fromkeys(SIDES, 0)  # values equal to the value put (compared outside the timing)
    for start in range(0, count, batch):
        order = SIDES[:2] if (start // batch) % 2 == 0 else SIDES[1::-1]
        for side in (*order, "arena"):
            block = keys[side][start : start + batch]
            started = time.perf_counter()
            got = b.get_many(block)
            seconds[side] += time.perf_counter() - started
            moved[side] += sum(len(v) for v in got.values())
            right[side] += sum(1 for v in got.values() if v == value)
            if len(got) != len(block) or right[side] != min(start + batch, count):
                raise click.ClickException(
                    f"{side}: agent B returned {len(got)} of {len(block)} chunks, or other bytes"
                )
    after = b.stats()["agent"]["sources"]["fetched"]
    if after["peer"] - before["peer"] != count or after["pool"] - before["pool"] != count:
        raise click.ClickException(f"agent B fetched from other sources than planned: {before} -> {after}")
    b.delete(keys["peer"] + keys["node"])  # keep the arenas small across runs
    a.delete(keys["peer"])
    node.delete(keys["node"])
    figures = {f"{side}_gbps": count * size / spent / 1e9 for side, spent in seconds.items()}
    return figures, moved, right


@click.command("p2p")
@option("--runs", type=click.IntRange(1, 100), default=5, help="Repetitions; medians are reported.")
@option("--total", default=256, type=click.IntRange(8, 4096), help="MiB fetched per side per run.")
@option("--chunk", default=4, type=click.IntRange(1, 64), help="Chunk size in MiB.")
@option(
    "--batch", default=16, type=click.IntRange(1, 256), help="Chunks per get_many (a connector's request)."
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of figures.")
def p2p(runs: int, total: int, chunk: int, batch: int, as_json: bool) -> None:
    """Agent-to-agent fetch GB/s beside a fetch of the same chunks from a cache node."""
    from kvpool.cachenode import Client
    from kvpool.cachenode.client.agent import AgentClient
    from kvpool.cachenode.client.lookup import LookupClient
    from kvpool.cli.devtools.local_servers import kvpool_agent, kvpool_up

    value = os.urandom(chunk * MiB)
    count = max(1, total // chunk)
    memory = f"{2 * count * chunk + 64}MiB"
    samples: dict[str, list[float]] = {}
    bytes_moved = dict.fromkeys(SIDES, 0)
    verified = dict.fromkeys(SIDES, 0)
    with kvpool_up("--memory", memory) as (up, node_url):
        lookup_url = up.stdout.readline().split()[2]  # "lookup service grpc://... (http ...)"
        with (
            kvpool_agent("bench-a", "--memory", memory, "--lookup-url", lookup_url) as (_, a_url),
            kvpool_agent(
                "bench-b", "--memory", memory, "--lookup-url", lookup_url, "--pool-url", node_url
            ) as (
                _,
                b_url,
            ),
            AgentClient(a_url, timeout=60) as a,
            AgentClient(b_url, timeout=60) as b,
            Client(node_url, timeout=60) as node,
            LookupClient(lookup_url) as lookup,
        ):
            _progress(
                f"agents {a_url} (peer), {b_url} (fetching); node {node_url}; lookup {lookup_url}; {runs} runs"
            )
            for run in range(-1, runs):  # run -1 warms connections, buffers and arenas; not counted
                figures, moved, right = _one_run(a, b, node, lookup, run, value, count, batch)
                if run >= 0:
                    for metric, v in figures.items():
                        samples.setdefault(metric, []).append(v)
                    for side in SIDES:
                        bytes_moved[side] += moved[side]
                        verified[side] += right[side]
                    _progress(
                        f"run {run + 1}/{runs}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items())
                    )
    result: dict = {"runs": runs, "mib_per_side_per_run": count * chunk, "chunk_mib": chunk, "batch": batch}
    labels = {"peer": "p2p_fetch_gbps", "node": "baseline_node_fetch_gbps", "arena": "arena_read_gbps"}
    result["get_path"] = "AgentClient.get_many (the connector's path to an agent), no malloc tuning"
    result["malloc_tuning"] = False
    result["bytes_expected"] = runs * count * chunk * MiB  # per side
    result["values_expected"] = runs * count
    result["bytes_moved"] = {labels[side]: n for side, n in bytes_moved.items()}
    result["values_verified"] = {labels[side]: n for side, n in verified.items()}
    for side, label in labels.items():
        result[label] = round(statistics.median(samples[f"{side}_gbps"]), 3)
        result[f"spread_{label}"] = _spread(samples[f"{side}_gbps"])
    per_run = [p / n for p, n in zip(samples["peer_gbps"], samples["node_gbps"], strict=True)]
    result["ratio_p2p_vs_node"] = round(statistics.median(per_run), 3)
    result["spread_ratio_p2p_vs_node"] = _spread(per_run)
    if not as_json:
        click.echo(
            f"{chunk} MiB chunks, {batch} per call: from a peer agent {result['p2p_fetch_gbps']:.2f} GB/s, from a "
            f"cache node {result['baseline_node_fetch_gbps']:.2f} GB/s (x{result['ratio_p2p_vs_node']:.2f}); "
            f"from the agent's own arena {result['arena_read_gbps']:.2f} GB/s"
        )
    click.echo(json.dumps(result))
