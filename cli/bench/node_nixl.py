"""`kvpool bench node --transport nixl`: a node's get/put over NIXL beside a raw NIXL READ of the
same bytes between two processes and beside kvpool's own TCP data channel, same run.

Every path moves the same batch of 32 MiB chunks per request and receives into memory that is
registered and faulted in once: the raw reader into its own region, kvpool's NIXL get and the
TCP data channel (`get_many_into`) into the client's receive pool. Puts send the caller's bytes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import click

MiB = 1024 * 1024
CHUNK = 32 * MiB


def _gbps(total_bytes: int, fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return total_bytes / (time.perf_counter() - started) / 1e9


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _get_into(client, keys: list[bytes]) -> None:
    for buf in client.get_many_into(keys).values():
        buf.release()


def run(runs: int, total: int, progress: Callable[[str], None]) -> dict:
    from kvpool.cachenode import Client
    from kvpool.cli.devtools.local_servers import kvpool_up

    from .nixl_raw import RawNixlReader

    count = max(1, total * MiB // CHUNK)
    moved = count * CHUNK
    raw = subprocess.Popen(
        [sys.executable, "-P", "-m", "kvpool.cli.bench.nixl_raw", str(CHUNK), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: dict[str, list[float]] = {}
    try:
        reader = RawNixlReader(raw.stdout.readline(), CHUNK, count)
        payload = reader.chunk(0)
        reader.read()
        keys = [b"bench-nixl-%d" % i for i in range(count)]
        items = [(k, payload) for k in keys]
        pool_bytes = moved + 64 * MiB
        with kvpool_up("--memory", f"{2 * moved // MiB + 64}MiB", "--nixl", "on") as (_, url):
            nixl = Client(url, transport="nixl", receive_buffer_bytes=pool_bytes)
            tcp = Client(url, transport="grpc", receive_buffer_bytes=pool_bytes)
            progress(f"node {url}: {nixl.transport_in_use}; {count} x 32 MiB per request, {runs} runs")
            for run in range(-1, runs):  # run -1 faults the buffers in and warms connections
                paths = [
                    ("baseline_tcp_channel_put_gbps", lambda: tcp.put_many(items)),
                    ("put_gbps", lambda: nixl.put_many(items)),
                    ("baseline_raw_nixl_gbps", reader.read),
                    ("baseline_tcp_channel_gbps", lambda: _get_into(tcp, keys)),
                    ("get_gbps", lambda: _get_into(nixl, keys)),
                ]
                # puts first (gets read what they stored), each group in a rotated order: on a
                # shared machine the load drifts within a run, and a fixed order would favour one path
                shift = max(run, 0)
                order = paths[:2][shift % 2 :] + paths[:2][: shift % 2]
                order += paths[2:][shift % 3 :] + paths[2:][: shift % 3]
                figures = {name: _gbps(moved, fn) for name, fn in order}
                got = nixl.get_many_into(keys[-1:])
                with got[keys[-1]] as buf:
                    if bytes(buf.view) != payload:
                        raise click.ClickException(
                            "kvpool returned bytes over NIXL that differ from what was put"
                        )
                if run >= 0:
                    for name, value in figures.items():
                        samples.setdefault(name, []).append(value)
                    progress(
                        f"run {run + 1}/{runs}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items())
                    )
            transport = nixl.transport_in_use
            stats = nixl.stats()
            nixl.close()
            tcp.close()
        reader.close()
    finally:
        raw.stdin.close()
        raw.wait(timeout=30)
    result: dict = {
        "transport": "nixl",
        "path": transport,
        "runs": runs,
        "chunk_mib": CHUNK // MiB,
        "chunks_per_request": count,
        "node_pinned_bytes_after": stats["pinned_bytes"],
    }
    for key, values in sorted(samples.items()):
        result[key] = round(statistics.median(values), 3)
        result[f"spread_{key}"] = _spread(values)
    pairs = {
        "ratio_get_vs_raw_nixl": ("get_gbps", "baseline_raw_nixl_gbps"),
        "ratio_get_vs_tcp_channel": ("get_gbps", "baseline_tcp_channel_gbps"),
        "ratio_put_vs_tcp_channel": ("put_gbps", "baseline_tcp_channel_put_gbps"),
    }
    for ratio, (ours, theirs) in pairs.items():  # per run, then the median (see node.py)
        per_run = [a / b for a, b in zip(samples[ours], samples[theirs], strict=True)]
        result[ratio] = round(statistics.median(per_run), 3)
        result[f"spread_{ratio}"] = _spread(per_run)
    result["goals_met"] = {
        "ratio_get_vs_raw_nixl>=0.8": result["ratio_get_vs_raw_nixl"] >= 0.8,
        "ratio_get_vs_tcp_channel>=1.5": result["ratio_get_vs_tcp_channel"] >= 1.5,
    }
    return result


def available() -> str | None:
    """Why NIXL cannot be benchmarked here, or None."""
    from kvpool.cachenode.client.nixl_common import load_nixl
    from kvpool.cachenode.core.errors import NixlUnavailable

    try:
        load_nixl()
    except NixlUnavailable as exc:
        return str(exc)
    return None if os.path.isdir("/proc") else "needs Linux"
