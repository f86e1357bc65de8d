"""`kvpool bench lookup`: the lookup service through gRPC, beside a bare in-process dict walk.

The service runs in its own process pinned to one CPU; this process (the load) runs on the
others. 1M keys over 64 holders are published through the Publish API in batches, then 128-key
longest-prefix queries go through the Locate API as a connector sends them: one unary call each,
keys packed in one bytes field, `--inflight` calls outstanding. The baseline answers the same
queries from a plain dict (key -> set of holder ids) in this process.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import sys
import threading
import time
import tracemalloc

import click

from ..options import option

QUERY_KEYS = 128
KEY_SIZE = 32


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _spread(values: list[float], digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@click.command("lookup")
@option(
    "--keys",
    "n_keys",
    type=click.IntRange(QUERY_KEYS, 50_000_000),
    default=1_000_000,
    help="Keys in the index.",
)
@option("--holders", type=click.IntRange(1, 4096), default=64, help="Holders the keys are spread over.")
@option("--queries", type=click.IntRange(100, 10_000_000), default=20_000, help="Queries per throughput run.")
@option(
    "--runs", type=click.IntRange(1, 100), default=3, help="Throughput/latency runs; medians are reported."
)
@option(
    "--inflight", type=click.IntRange(1, 1024), default=16, help="Queries outstanding in the throughput runs."
)
@option("--batch", type=click.IntRange(1, 1_000_000), default=16384, help="Events per published batch.")
@option("--server-cpu", type=int, default=-1, help="CPU to pin the service to (-1: the last one allowed).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of figures.")
def lookup(n_keys: int, holders: int, queries: int, runs: int, inflight: int, batch: int, server_cpu: int,
           as_json: bool) -> None:  # fmt: skip
    """Lookup keys/s, p50/p99, ingest events/s and bytes per entry, vs a plain dict walk."""
    from kvpool.cachenode.client.lookup import LookupClient
    from kvpool.cachenode.rpc.channels import open_url
    from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
    from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc
    from kvpool.cli.devtools.local_servers import kvpool_lookup

    allowed = sorted(os.sched_getaffinity(0))
    server = allowed[-1] if server_cpu < 0 else server_cpu
    if server not in allowed:
        raise click.BadParameter(
            f"CPU {server} is not one this process may use ({allowed})", param_hint="--server-cpu"
        )
    load_cpus = set(allowed) - {server} or {server}
    os.sched_setaffinity(0, load_cpus)
    rng = random.Random(12)

    _progress(f"making {n_keys} keys over {holders} holders (sequences of {QUERY_KEYS} keys) ...")
    blob = rng.randbytes(n_keys * KEY_SIZE)
    keys = [blob[i : i + KEY_SIZE] for i in range(0, len(blob), KEY_SIZE)]
    sequences = n_keys // QUERY_KEYS  # sequence s = keys[s*128 : (s+1)*128], held by holder s % holders
    owner = [(i // QUERY_KEYS) % holders for i in range(n_keys)]

    with kvpool_lookup("--holder-lease", "3600", "--rebuild-window", "0", "--log-level", "warning",
                       "--max-batch-events", str(max(batch, 65536)), cpus={server}) as service:  # fmt: skip
        channel = open_url(service.url, options=[("grpc.max_send_message_length", 64 << 20)])
        stub = pb_grpc.LookupStub(channel)
        stats = LookupClient(service.url, timeout=60)
        rss_empty = stats.stats()["rss_bytes"]

        # -- ingest ----------------------------------------------------------------------------
        for h in range(holders):
            frame = pb.LookupResyncFrame(holder=pb.LookupHolder(holder_id=f"bench-{h}", kind="agent", tier="memory",
                                         address=f"grpc://10.0.{h // 256}.{h % 256}:7420"), incarnation=1, seq=1)  # fmt: skip
            stub.Resync(iter([frame]), timeout=60)
        per_holder: list[list[bytes]] = [[] for _ in range(holders)]
        for i, key in enumerate(keys):
            per_holder[owner[i]].append(key)
        requests = []
        for h, held in enumerate(per_holder):
            for seq, start in enumerate(range(0, len(held), batch), start=2):
                block = pb.LookupKeys(key_size=KEY_SIZE, keys=b"".join(held[start : start + batch]))
                requests.append(pb.LookupPublishRequest(holder_id=f"bench-{h}", incarnation=1, seq=seq,
                                                        admitted=[block]))  # fmt: skip
        _progress(f"ingesting {n_keys} admit events in {len(requests)} Publish calls of up to {batch} ...")
        threads, failures = 4, []

        def publish(part: list) -> None:
            for request in part:
                reply = stub.Publish(request, timeout=120)
                if reply.status != pb.LookupPublishResponse.OK:
                    failures.append(reply.reason)

        # Each holder's batches stay in order: a thread takes whole holders.
        parts = [
            [r for r in requests if int(r.holder_id.split("-")[1]) % threads == t] for t in range(threads)
        ]
        started = time.perf_counter()
        workers = [threading.Thread(target=publish, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        ingest_s = time.perf_counter() - started
        if failures:
            raise click.ClickException(f"the service refused batches: {failures[:3]}")
        index = stats.stats()
        if index["entries"] != n_keys or index["keys"] != n_keys:
            raise click.ClickException(f"the index holds {index['entries']} entries, expected {n_keys}")

        # -- queries ---------------------------------------------------------------------------
        absent = [rng.randbytes(KEY_SIZE) for _ in range(QUERY_KEYS)]
        planned = []  # (request, expected prefix, holder)
        for _ in range(2000):
            s = rng.randrange(sequences)
            cut = rng.randrange(QUERY_KEYS // 2, QUERY_KEYS + 1)
            query = keys[s * QUERY_KEYS : s * QUERY_KEYS + cut] + absent[: QUERY_KEYS - cut]
            planned.append((query, cut, f"bench-{s % holders}"))
        wire = [
            pb.LookupLocateRequest(keys=pb.LookupKeys(key_size=KEY_SIZE, keys=b"".join(q)))
            for q, _, _ in planned
        ]
        for i, (request, (_, cut, holder)) in enumerate(zip(wire, planned, strict=True)):
            if i >= 200:
                break
            reply = stub.Locate(request, timeout=10)
            if reply.prefix != cut or [m.holder.holder_id for m in reply.holders] != [holder]:
                raise click.ClickException(f"wrong answer: prefix {reply.prefix} (expected {cut})")

        throughput, p50s, p99s, loaded_p99s, baselines, noop = [], [], [], [], [], []
        noop_p50s: list[float] = []
        noop_p99s: list[float] = []
        noop_server, noop_channel = _start_noop_server(server)
        noop_stub = pb_grpc.LookupStub(noop_channel)
        for run in range(runs):
            _progress(
                f"run {run + 1}/{runs}: {queries} queries of {QUERY_KEYS} keys, {inflight} in flight ..."
            )
            keys_per_s, loaded_p99 = _throughput(stub, wire, queries, inflight)
            throughput.append(keys_per_s)
            loaded_p99s.append(loaded_p99)
            noop.append(_throughput(noop_stub, wire, queries, inflight)[0])

            p50, p99 = _latency(stub, wire, min(queries, 5000))
            p50s.append(p50)
            p99s.append(p99)
            noop_p50, noop_p99 = _latency(noop_stub, wire, min(queries, 5000))
            noop_p50s.append(noop_p50)
            noop_p99s.append(noop_p99)

            baselines.append(_dict_walk_keys_per_s(keys, owner, planned, queries))
        index = stats.stats()
        stats.close()
        channel.close()
        noop_channel.close()
        noop_server.terminate()
        noop_server.wait(timeout=10)

    _progress("measuring the baseline dict's memory ...")
    dict_bytes = _dict_bytes_per_entry(keys, owner)
    figures = {
        "lookup_keys_per_s": round(statistics.median(throughput)),
        "lookup_p50_ms": round(statistics.median(p50s), 3),
        "lookup_p99_ms": round(statistics.median(p99s), 3),
        "lookup_loaded_p99_ms": round(statistics.median(loaded_p99s), 3),
        "ingest_events_per_s": round(n_keys / ingest_s),
        "bytes_per_entry": index["bytes_per_entry"],
        "rss_bytes_per_entry": round((index["rss_bytes"] - rss_empty) / index["entries"], 1),
        "baseline_dict_keys_per_s": round(statistics.median(baselines)),
        "baseline_grpc_noop_keys_per_s": round(statistics.median(noop)),
        "baseline_grpc_noop_p50_ms": round(statistics.median(noop_p50s), 3),
        "baseline_grpc_noop_p99_ms": round(statistics.median(noop_p99s), 3),
        "baseline_dict_bytes_per_entry": round(dict_bytes, 1),
        "ratio_lookup_vs_dict": round(
            statistics.median(t / b for t, b in zip(throughput, baselines, strict=True)), 4
        ),
        "ratio_lookup_vs_grpc_noop": round(
            statistics.median(t / b for t, b in zip(throughput, noop, strict=True)), 4
        ),
        "ratio_bytes_vs_dict": round(index["bytes_per_entry"] / dict_bytes, 3),
        "keys": n_keys,
        "holders": holders,
        "entries": index["entries"],
        "query_keys": QUERY_KEYS,
        "inflight": inflight,
        "runs": runs,
        "server_cpu": server,
        "load_cpus": sorted(load_cpus),
        "spread": {
            "lookup_keys_per_s": _spread(throughput, 0),
            "lookup_p50_ms": _spread(p50s),
            "lookup_p99_ms": _spread(p99s),
            "lookup_loaded_p99_ms": _spread(loaded_p99s),
            "baseline_dict_keys_per_s": _spread(baselines, 0),
            "baseline_grpc_noop_keys_per_s": _spread(noop, 0),
            "baseline_grpc_noop_p99_ms": _spread(noop_p99s),
        },
    }
    if as_json:
        click.echo(json.dumps(figures))
    else:
        for name, value in figures.items():
            click.echo(f"{name:32} {value}")
    sys.stdout.flush()


def _throughput(stub, requests: list, queries: int, inflight: int) -> tuple[float, float]:
    """Keys/s of `queries` Locate calls with `inflight` outstanding, and their p99 in ms."""
    done_ms: list[float] = []
    pending: list = []
    started = time.perf_counter()
    for i in range(queries):
        if len(pending) >= inflight:
            future, t0 = pending.pop(0)
            future.result()
            done_ms.append((time.perf_counter() - t0) * 1e3)
        pending.append((stub.Locate.future(requests[i % len(requests)], timeout=30), time.perf_counter()))
    for future, t0 in pending:
        future.result()
        done_ms.append((time.perf_counter() - t0) * 1e3)
    elapsed = time.perf_counter() - started
    done_ms.sort()
    return queries * QUERY_KEYS / elapsed, _percentile(done_ms, 0.99)


def _latency(stub, requests: list, calls: int) -> tuple[float, float]:
    """p50 and p99 in ms of `calls` Locate calls, one at a time."""
    latencies = []
    for i in range(calls):
        t0 = time.perf_counter()
        stub.Locate(requests[(i * 7) % len(requests)], timeout=10)
        latencies.append((time.perf_counter() - t0) * 1e3)
    latencies.sort()
    return _percentile(latencies, 0.5), _percentile(latencies, 0.99)


def _start_noop_server(cpu: int):
    """The same-run gRPC baseline: a server on the same CPU that answers Locate with nothing."""
    import subprocess

    from kvpool.cachenode.rpc.channels import open_url
    from kvpool.cli.devtools.local_servers import free_port, wait_port

    port = free_port()
    cmd = [sys.executable, "-P", "-m", "kvpool.cli.bench.lookup", str(port)]
    proc = subprocess.Popen(cmd, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    wait_port(port, proc=proc)
    return proc, open_url(f"grpc://127.0.0.1:{port}")


def serve_noop(port: int) -> None:
    """Answer every kvpool.v1.Lookup/Locate with an empty message, with the service's thread pool."""
    from concurrent import futures

    import grpc

    from kvpool.cachenode.server.lookup.server import GRPC_WORKERS

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS))
    locate = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")  # raw bytes in and out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("kvpool.v1.Lookup", {"Locate": locate}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def _dict_walk_keys_per_s(keys: list[bytes], owner: list[int], planned: list, queries: int) -> float:
    """The same longest-prefix questions answered from a plain dict in this process."""
    table = _baseline_dict(keys, owner)
    lists = [q for q, _, _ in planned]
    started = time.perf_counter()
    for i in range(queries):
        holders: set[int] = set()
        for key in lists[i % len(lists)]:
            held = table.get(key)
            if held is None:
                break
            holders |= held
    elapsed = time.perf_counter() - started
    return queries * QUERY_KEYS / elapsed


def _baseline_dict(keys: list[bytes], owner: list[int]) -> dict[bytes, set[int]]:
    return {key: {h} for key, h in zip(keys, owner, strict=True)}


def _dict_bytes_per_entry(keys: list[bytes], owner: list[int]) -> float:
    """Bytes the dict baseline needs per (key, holder): its table and sets (traced) plus the keys."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = _baseline_dict(keys, owner)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    key_bytes = sum(sys.getsizeof(k) for k in keys)
    return (used + key_bytes) / len(table)


if __name__ == "__main__":
    serve_noop(int(sys.argv[1]))
