"""`kvpool bench node --transport nixl`: a node's get/put over NIXL beside a raw NIXL READ of the
same bytes between two processes and beside kvpool's own TCP data channel, same run.

Every path moves the same batch of 32 MiB chunks per request and receives into memory that is
registered and faulted in once: the raw reader into its own region, kvpool's NIXL get and the
TCP data channel (`get_many_into`) into the client's receive pool. Puts send the caller's bytes.
Within a run the puts go first, then the gets, each group in an order rotated run by run. Every
get path counts the bytes it received and the ends of each chunk (the raw reader's region blanked
at the ends before each READ), reported beside what was expected.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import click

from .moved import SAMPLE, Moved

MiB = 1024 * 1024
CHUNK = 32 * MiB


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _get_into(client, keys: list[bytes]) -> Moved:
    """The connector's read: every value into a pooled buffer, read (its bytes counted, its ends
    kept), released."""
    moved = Moved()
    for buf in client.get_many_into(keys).values():
        with buf:
            moved.add(buf.view)
    return moved


def _raw_read(reader) -> Moved:
    """The raw READ, after blanking the ends of every chunk in the reader's region (32 bytes a
    chunk, inside the timing and negligible beside 32 MiB), so the ends read back show that this
    READ wrote them."""
    view = reader.region.view
    for i in range(reader.count):
        start, end = i * reader.size, (i + 1) * reader.size
        view[start : start + SAMPLE] = bytes(SAMPLE)
        view[end - SAMPLE : end] = bytes(SAMPLE)
    reader.read()
    moved = Moved()
    for i in range(reader.count):
        moved.add(view[i * reader.size : (i + 1) * reader.size])
    return moved


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
    bytes_moved: dict[str, int] = {}  # get path -> bytes received over the counted runs
    verified: dict[str, int] = {}  # get path -> chunks whose ends were the payload's
    try:
        reader = RawNixlReader(raw.stdout.readline(), CHUNK, count)
        reader.read()  # first: the region holds the served bytes only once read
        payload = reader.chunk(0)  # what kvpool's paths put and get: the raw READ's bytes
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
                    ("baseline_raw_nixl_gbps", lambda: _raw_read(reader)),
                    ("baseline_tcp_channel_gbps", lambda: _get_into(tcp, keys)),
                    ("get_gbps", lambda: _get_into(nixl, keys)),
                ]
                # puts first (gets read what they stored), each group in a rotated order: on a
                # shared machine the load drifts within a run, and a fixed order would favour one path
                shift = max(run, 0)
                order = paths[:2][shift % 2 :] + paths[:2][: shift % 2]
                order += paths[2:][shift % 3 :] + paths[2:][: shift % 3]
                figures = {}
                for name, fn in order:
                    started = time.perf_counter()
                    out = fn()
                    figures[name] = moved / (time.perf_counter() - started) / 1e9
                    if run >= 0 and isinstance(out, Moved):
                        bytes_moved[name] = bytes_moved.get(name, 0) + out.nbytes
                        verified[name] = verified.get(name, 0) + out.matches([payload] * count)
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
        "order": "puts, then gets; each group rotated run by run",
        "bytes_expected": runs * moved,  # per get path
        "values_expected": runs * count,
        "bytes_moved": bytes_moved,
        "values_verified": verified,
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
