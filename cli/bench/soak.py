"""`kvpool bench soak`: a long mixed load on a small pool, to show its memory stays bounded.

It starts `kvpool up --nodes N` (default 3) with a small memory budget per node and the lookup
service `up` runs, then K worker processes (soak_worker.py) that put values of mixed sizes (4 KiB
to 4 MiB) under keys drawn from a keyspace far larger than the budget holds (so the nodes evict
all along), read them back through the connector's receive path (`get_many_into`) and
`Client.get`, checking every byte (soak_values.py), and ask `prefix_hits`, `contains` and the
lookup service's Locate. Every `--interval` seconds it reads each node's, the `up` process's and
each worker's VmRSS from /proc and each node's memory tier from the pool's stats. It reports RSS
after the warm-up (the first 20% of the run, at least 10 s) and at the end, the growth between,
the largest memory use against the budget, errors, wrong bytes, misses and ops/s and GB/s per
operation (soak_report.py). Exit status 1 when any byte read was wrong, or a worker died.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from ..options import SIZE, option
from . import soak_report as report
from .node import _progress

PROGRESS_EVERY_S = 30.0
WORKER_GRACE_S = 60.0  # a worker still running this long after its deadline is stuck


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def node_pids(up_pid: int) -> dict[str, int]:
    """The `kvpool node` children of a `kvpool up` process, by node id (KVPOOL_NODE_ID)."""
    children = []
    for task in Path(f"/proc/{up_pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    found = {}
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        node = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"KVPOOL_NODE_ID=")), None)
        if node:
            found[node] = pid
    return found


def lookup_url(line: str) -> str:
    """The lookup service's URL from `kvpool up`'s second line."""
    match = re.search(r"grpcs?://\S+", line)
    if not match:
        raise click.ClickException(f"kvpool up did not print its lookup service's URL (printed {line!r})")
    return match.group(0)


def sample(t: float, nodes: dict[str, int], up_pid: int, rss_workers: list[int], client) -> report.Sample:
    """RSS from /proc and each node's memory tier from the pool's stats, now; `rss_workers` as
    read by the caller (a worker's last reading stands once it has exited)."""
    usage = {}
    for node, entry in client.stats()["nodes"].items():
        memory = entry.get("tiers", {}).get("memory")
        if memory:
            usage[node] = {**memory, "pinned_bytes": entry.get("pinned_bytes", 0)}
    return report.Sample(
        t=t,
        rss_nodes={node: rss_bytes(pid) for node, pid in nodes.items()},
        rss_lookup=rss_bytes(up_pid),
        rss_workers=list(rss_workers),
        usage=usage,
    )


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _start_worker(config: dict) -> subprocess.Popen:
    command = [sys.executable, "-P", "-m", "kvpool.cli.bench.soak_worker", json.dumps(config)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _collect(workers: list[subprocess.Popen]) -> list[dict]:
    results = []
    for i, worker in enumerate(workers):
        out, _ = worker.communicate()
        lines = out.strip().splitlines()
        if worker.returncode != 0 or not lines:
            raise click.ClickException(f"soak worker {i} exited with code {worker.returncode}")
        results.append(json.loads(lines[-1]))
    return results


@click.command("soak")
@option(
    "--minutes",
    type=click.FloatRange(0.25, 24 * 60),
    default=10.0,
    show_default=True,
    help="Length of the load (a float: 1.0 in the test suite).",
)
@option("--nodes", type=click.IntRange(1, 16), default=3, show_default=True, help="kvpool up --nodes N.")
@option("--workers", type=click.IntRange(1, 64), default=3, show_default=True, help="Load processes.")
@option("--memory", type=SIZE, default="64MiB", show_default=True, help="Memory budget of each node.")
@option(
    "--keyspace",
    type=click.IntRange(100, 10**9),
    default=100_000,
    show_default=True,
    help="Keys the puts draw from (at ~600 KiB a value, far more than the budget holds).",
)
@option(
    "--interval",
    type=click.FloatRange(0.2, 60),
    default=1.0,
    show_default=True,
    help="Seconds between RSS and usage samples.",
)
@option("--seed", type=int, default=0, show_default=True, help="Seed of the workers' draws.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object of figures, nothing else on stdout."
)
def soak(minutes: float, nodes: int, workers: int, memory: int, keyspace: int, interval: float,
         seed: int, as_json: bool) -> None:  # fmt: skip
    """Mixed put/get/lookup load from several processes on a small pool: RSS growth after
    warm-up, memory use vs budget, errors, wrong bytes, throughput."""
    from kvpool.cachenode import Client
    from kvpool.cli.devtools.local_servers import kvpool_up

    signal.signal(signal.SIGTERM, _stop)  # a stopped soak still stops its pool and workers
    seconds = 60.0 * minutes
    warmup_s = report.warmup_seconds(seconds)
    samples: list[report.Sample] = []
    with kvpool_up("--nodes", str(nodes), "--memory", str(memory)) as (up, url):
        lookup = lookup_url(up.stdout.readline())
        pids = node_pids(up.pid)
        if len(pids) != nodes:
            raise click.ClickException(f"found {len(pids)} node processes under kvpool up, expected {nodes}")
        with Client(url, transport="grpc") as client:
            _progress(f"soak: {nodes} nodes at {url} ({memory} bytes each), lookup {lookup}; "
                      f"{workers} workers for {seconds:.0f} s, warm-up {warmup_s:.0f} s")  # fmt: skip
            config = {"url": url, "lookup_url": lookup, "seconds": seconds, "keyspace": keyspace}
            procs = [_start_worker({**config, "seed": seed * 1000 + i}) for i in range(workers)]
            try:
                started = time.monotonic()
                next_at, next_progress = started, started + PROGRESS_EVERY_S
                workers_rss = [0] * workers
                while any(p.poll() is None for p in procs):
                    now = time.monotonic()
                    if now > started + seconds + WORKER_GRACE_S:
                        raise click.ClickException(
                            f"soak workers still running {WORKER_GRACE_S:.0f} s after the end"
                        )
                    if now >= next_at:
                        workers_rss = [
                            rss_bytes(p.pid) or last for p, last in zip(procs, workers_rss, strict=True)
                        ]
                        samples.append(sample(now - started, pids, up.pid, workers_rss, client))
                        next_at = max(next_at + interval, time.monotonic())  # no burst after a slow one
                    if now >= next_progress:
                        s = samples[-1]
                        _progress(f"{s.t:.0f}s: rss nodes {s.group('nodes') / 2**20:.0f} MiB, "
                                  f"used {sum(u['used'] for u in s.usage.values()) / 2**20:.0f} MiB")  # fmt: skip
                        next_progress += PROGRESS_EVERY_S
                    time.sleep(min(0.1, max(0.0, next_at - time.monotonic())))
                results = _collect(procs)
                samples.append(sample(time.monotonic() - started, pids, up.pid, workers_rss, client))
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
    load_s = max(r["seconds"] for r in results)
    figures: dict = {
        "minutes": minutes,
        "nodes": nodes,
        "workers": workers,
        "memory_budget_per_node_bytes": memory,
        "keyspace": keyspace,
        "value_sizes": "4 KiB..4 MiB, log-uniform, derived from the key; every value read checked whole",
        "warmup_s": round(warmup_s, 1),
        "interval_s": interval,
        "samples": len(samples),
        **report.rss_figures(samples, warmup_s),
        **report.usage_figures(samples),
        **report.load_figures(results, load_s),
    }
    figures["goals"] = report.goals(figures)
    if as_json:
        click.echo(json.dumps(figures))
    else:
        _human(figures)
    if not figures["goals"]["zero_wrong_bytes"]:
        raise SystemExit(1)


def _human(f: dict) -> None:
    MiB = 2**20
    click.echo(f"{f['load_seconds']:.0f} s, {f['nodes']} nodes x {f['memory_budget_per_node_bytes'] / MiB:.0f} MiB, "
               f"{f['workers']} workers, {f['samples']} samples")  # fmt: skip
    click.echo(f"node RSS after warm-up {f['rss_warmup_bytes']['nodes'] / MiB:.1f} MiB, at end "
               f"{f['rss_end_bytes']['nodes'] / MiB:.1f} MiB ({f['rss_growth_pct_nodes']:+.2f}%, worst node "
               f"{f['rss_growth_pct_max_node']:+.2f}%); lookup/up {f['rss_growth_pct']['lookup']:+.2f}%, "
               f"workers {f['rss_growth_pct']['workers']:+.2f}%")  # fmt: skip
    click.echo(f"memory use max {f['usage_max_bytes'] / MiB:.1f} MiB of {f['budget_per_node_bytes'] / MiB:.0f} MiB "
               f"({100 * f['usage_max_ratio']:.1f}%), evictions {f['evictions']}")  # fmt: skip
    for op, n in f["ops"].items():
        gbps = f["gbps"].get(op)
        click.echo(
            f"  {op:14} {n:8} ops {f['ops_per_s'][op]:8.1f}/s" + (f"  {gbps:.3f} GB/s" if gbps else "")
        )
    click.echo(f"reads: miss ratio {f['miss_ratio']:.3f}; errors {f['errors']}, wrong values {f['wrong_values']}, "
               f"wrong bytes {f['wrong_bytes']}; goals {f['goals']}")  # fmt: skip
