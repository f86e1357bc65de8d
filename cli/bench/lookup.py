"""`kvpool bench lookup`: the lookup service as its clients ask it, beside same-run ceilings.

The service runs in its own process pinned to one CPU; this process (the load) runs on the
others. 1M keys over 64 holders are published through the Publish API in batches, then 128-key
longest-prefix queries go the way `LookupClient` sends them: over the lean query channel (one
TCP round trip each, `--inflight` pipelined on one connection; `lookup_*`), and, for comparison,
as gRPC unary calls (`lookup_grpc_*`, `--inflight` futures outstanding). Baselines in the same
run: a no-op server on the same CPU with the service's own serving code for each transport
(lookup_noop.py: `baseline_tcp_noop_*`, `baseline_grpc_noop_*`), and a plain dict
(key -> set of holder ids) answering the same queries in this process. `*_server_cpu_us_per_query`:
the serving process's CPU time (user + system, /proc) over a throughput run per query, which the
machine's other load moves far less than the wall-clock figures. Before the queries are
timed, this process's millions of long-lived objects are moved out of the garbage collector's
reach (`gc.freeze()`): otherwise its full collections, not the service, set the tail latencies.
"""

from __future__ import annotations

import collections
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


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (0 where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


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
    """Lookup keys/s, p50/p99, ingest events/s and bytes per entry, vs no-op servers and a dict walk."""
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
        lists = [q for q, _, _ in planned]
        wire = [
            pb.LookupLocateRequest(keys=pb.LookupKeys(key_size=KEY_SIZE, keys=b"".join(q))) for q in lists
        ]
        client = LookupClient(service.url, timeout=30, transport="tcp")
        for i, (request, (query, cut, holder)) in enumerate(zip(wire, planned, strict=True)):
            if i >= 200:
                break
            reply = stub.Locate(request, timeout=10)
            if reply.prefix != cut or [m.holder.holder_id for m in reply.holders] != [holder]:
                raise click.ClickException(f"wrong gRPC answer: prefix {reply.prefix} (expected {cut})")
            answer = client.locate(query)
            if answer.prefix != cut or [m.info.holder_id for m in answer.holders] != [holder]:
                raise click.ClickException(
                    f"wrong query channel answer: prefix {answer.prefix} (expected {cut})"
                )

        # The keys and requests above are millions of long-lived objects: keep the collector from
        # walking them again and again while the queries are timed.
        gc.collect()
        gc.freeze()
        noop_server, noop_url = _start_noop_server(server)
        noop_grpc = pb_grpc.LookupStub(open_url(noop_url))
        noop_client = LookupClient(noop_url, timeout=30, transport="tcp")
        figures: dict[str, list[float]] = {}

        def note(name: str, value: float) -> None:
            figures.setdefault(name, []).append(value)

        for run in range(runs):
            _progress(
                f"run {run + 1}/{runs}: {queries} queries of {QUERY_KEYS} keys, {inflight} in flight, "
                "query channel and gRPC, service and no-op ..."
            )
            for prefix, tcp, pid in (
                ("lookup", client, service.proc.pid),
                ("baseline_tcp_noop", noop_client, noop_server.pid),
            ):
                cpu = _cpu_seconds(pid)
                keys_per_s, loaded_p99 = _pipelined(tcp, lists, queries, inflight)
                note(f"{prefix}_server_cpu_us_per_query", (_cpu_seconds(pid) - cpu) / queries * 1e6)
                note(f"{prefix}_keys_per_s", keys_per_s)
                note(f"{prefix}_loaded_p99_ms", loaded_p99)
                p50, p99 = _latency(
                    lambda i, c=tcp: c.locate(lists[(i * 7) % len(lists)]), min(queries, 5000)
                )
                note(f"{prefix}_p50_ms", p50)
                note(f"{prefix}_p99_ms", p99)
            for prefix, grpc_stub, pid in (
                ("lookup_grpc", stub, service.proc.pid),
                ("baseline_grpc_noop", noop_grpc, noop_server.pid),
            ):
                cpu = _cpu_seconds(pid)
                keys_per_s, loaded_p99 = _throughput(grpc_stub, wire, queries, inflight)
                note(f"{prefix}_server_cpu_us_per_query", (_cpu_seconds(pid) - cpu) / queries * 1e6)
                note(f"{prefix}_keys_per_s", keys_per_s)
                note(f"{prefix}_loaded_p99_ms", loaded_p99)
                p50, p99 = _latency(
                    lambda i, st=grpc_stub: st.Locate(wire[(i * 7) % len(wire)], timeout=10),
                    min(queries, 5000),
                )
                note(f"{prefix}_p50_ms", p50)
                note(f"{prefix}_p99_ms", p99)
            note("baseline_dict_keys_per_s", _dict_walk_keys_per_s(keys, owner, planned, queries))
        index = stats.stats()
        for closing in (client, noop_client, stats):
            closing.close()
        channel.close()
        noop_server.terminate()
        noop_server.wait(timeout=10)

    _progress("measuring the baseline dict's memory ...")
    dict_bytes = _dict_bytes_per_entry(keys, owner)

    def ratio(top: str, bottom: str) -> float:
        return round(statistics.median(t / b for t, b in zip(figures[top], figures[bottom], strict=True)), 4)

    out: dict = {}
    for name, values in figures.items():
        out[name] = (
            round(statistics.median(values))
            if name.endswith("_per_s")
            else round(statistics.median(values), 3)
        )
    out |= {
        "transport": "tcp query channel (LookupClient's default); lookup_grpc_*: gRPC unary calls",
        "ingest_events_per_s": round(n_keys / ingest_s),
        "bytes_per_entry": index["bytes_per_entry"],
        "rss_bytes_per_entry": round((index["rss_bytes"] - rss_empty) / index["entries"], 1),
        "baseline_dict_bytes_per_entry": round(dict_bytes, 1),
        "ratio_lookup_vs_tcp_noop": ratio("lookup_keys_per_s", "baseline_tcp_noop_keys_per_s"),
        "ratio_lookup_vs_grpc": ratio("lookup_keys_per_s", "lookup_grpc_keys_per_s"),
        "ratio_lookup_vs_grpc_noop": ratio("lookup_keys_per_s", "baseline_grpc_noop_keys_per_s"),
        "lookup_keys_per_server_cpu_s": round(
            QUERY_KEYS / statistics.median(figures["lookup_server_cpu_us_per_query"]) * 1e6
        )
        if statistics.median(figures["lookup_server_cpu_us_per_query"]) > 0
        else None,
        "ratio_server_cpu_grpc_vs_lookup": ratio(
            "lookup_grpc_server_cpu_us_per_query", "lookup_server_cpu_us_per_query"
        )
        if min(figures["lookup_server_cpu_us_per_query"]) > 0
        else None,
        "ratio_lookup_vs_dict": ratio("lookup_keys_per_s", "baseline_dict_keys_per_s"),
        "ratio_lookup_grpc_vs_grpc_noop": ratio("lookup_grpc_keys_per_s", "baseline_grpc_noop_keys_per_s"),
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
            name: _spread(values, 0 if name.endswith("_per_s") else 3) for name, values in figures.items()
        },
    }
    figures = out
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


def _pipelined(client, lists: list, queries: int, inflight: int) -> tuple[float, float]:
    """Keys/s of `queries` locates pipelined `inflight` deep on the query channel, and the p99 in
    ms of each one's time from its send to its answer."""
    sent: collections.deque[float] = collections.deque()
    done_ms: list[float] = []

    def stream():
        for i in range(queries):
            sent.append(time.perf_counter())
            yield lists[i % len(lists)]

    started = time.perf_counter()
    for _ in client.locate_stream(stream(), window=inflight):
        done_ms.append((time.perf_counter() - sent.popleft()) * 1e3)
    elapsed = time.perf_counter() - started
    done_ms.sort()
    return queries * QUERY_KEYS / elapsed, _percentile(done_ms, 0.99)


def _latency(call, calls: int) -> tuple[float, float]:
    """p50 and p99 in ms of `calls` calls, one at a time."""
    latencies = []
    for i in range(calls):
        t0 = time.perf_counter()
        call(i)
        latencies.append((time.perf_counter() - t0) * 1e3)
    latencies.sort()
    return _percentile(latencies, 0.5), _percentile(latencies, 0.99)


def _start_noop_server(cpu: int):
    """The same-run ceilings (lookup_noop.py) on the service's CPU; returns (process, grpc URL)."""
    import subprocess

    from kvpool.cli.devtools.local_servers import free_port, wait_port

    port = free_port()
    cmd = [sys.executable, "-P", "-m", "kvpool.cli.bench.lookup_noop", str(port)]
    proc = subprocess.Popen(cmd, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    wait_port(port, proc=proc)
    return proc, f"grpc://127.0.0.1:{port}"


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
