"""`kvpool bench node`: Client put/get GB/s beside a plain TCP socket and Valkey, same run;
with `--transport nixl`, over NIXL beside a raw NIXL READ and the TCP data channel
(node_nixl.py).

The get is the connector's path: `Client.get_many_into` receives each value straight into the
client's pooled, page-aligned receive buffers, released once read, so nothing is allocated per
value and the process needs no malloc tuning (it tunes none unless `--malloc-tuning`).

Within a run the puts go first (each get reads what its own put stored), then the gets, each
group in an order rotated run by run, so no path always runs first on a machine whose load drifts.
Valkey is measured twice for gets: valkey-py's `GET` (its default reader, which allocates each
value) and a `GET` on one connection received with `recv_into` into a reused buffer
(tiers_raw.RawValkey), one key per request as kvpool's get. Every path counts the bytes it moved
and the ends of each value it got; the JSON reports them beside what was expected.

With `--lmcache PYTHON` (the interpreter of LMCache's venv, scripts/install-lmcache.sh), LMCache
0.5.6's own `lm://` server and client are two more paths of the same run (lmcache.py), rotated
with the others, with their ratios to the same-run socket."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import click

from ..options import option
from .lmcache import LMCache, Timed
from .lmcache import check as check_lmcache
from .moved import Moved

MiB = 1024 * 1024
SIZES = {"4m": 4 * MiB, "32m": 32 * MiB}


def _progress(message: str) -> None:
    click.echo(message, err=True)


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


def _rotated(paths: list, shift: int) -> list:
    """`paths` rotated by `shift`: each path leads in turn, so load that drifts within a run does
    not always fall on the same one."""
    shift %= len(paths)
    return paths[shift:] + paths[:shift]


def _measure(
    client, raw, vclient, vraw, value: bytes, count: int, shift: int, lm: LMCache | None = None
) -> tuple[dict, dict]:
    """One pass of every path over `count` values of one size: GB/s per path, and what each moved.

    The puts run first (each get reads what its put stored), then the gets; within each group
    the order is rotated by `shift` (the run's number), so no path always runs first."""
    size = len(value)
    keys = [f"bench-{size}-{i}".encode() for i in range(count)]
    view = memoryview(value)

    def tcp_get() -> Moved:
        moved = Moved()
        for _ in keys:
            moved.add(raw.get(size))
        return moved

    def get() -> Moved:
        moved = Moved()
        for k in keys:
            _get_into(client, k, moved)
        return moved

    def valkey_get() -> Moved:
        moved = Moved()
        for k in keys:
            moved.add(memoryview(vclient.get(k)))
        return moved

    def valkey_recv_into_get() -> Moved:  # one key per request, as kvpool's get
        moved = Moved()
        for k in keys:
            moved.extend(vraw.get_many([k]))
        return moved

    def put() -> int:
        for k in keys:
            client.put(k, value)
        return count * size

    puts = [
        ("baseline_tcp_put_gbps", lambda: sum(raw.put(view) for _ in keys)),
        ("put_gbps", put),
        ("baseline_valkey_put_gbps", lambda: sum(size for k in keys if vclient.set(k, value))),
    ]
    gets = [
        ("baseline_tcp_gbps", tcp_get),
        ("get_gbps", get),
        ("baseline_valkey_get_gbps", valkey_get),
        ("baseline_valkey_recv_into_get_gbps", valkey_recv_into_get),
    ]
    if lm is not None:  # timed in LMCache's driver process: Timed carries its seconds
        puts.append(("lmcache_put_gbps", lambda: lm.put(size, count)))
        gets.append(("lmcache_get_gbps", lambda: lm.get(size, count)))
    figures: dict[str, float] = {}
    moved: dict[str, tuple[int, int | None]] = {}  # path -> (bytes, values right; None for puts)
    for name, fn in _rotated(puts, shift) + _rotated(gets, shift):
        started = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - started
        if isinstance(out, Timed):
            seconds, out = out.seconds, out.out
        figures[name] = count * size / seconds / 1e9
        moved[name] = (out.nbytes, out.matches([value] * count)) if isinstance(out, Moved) else (out, None)
    for key in (keys[0], keys[-1]):  # checked outside the timed pass
        with client.get_many_into([key])[key] as buf:
            if buf.view != value:
                raise click.ClickException("kvpool returned bytes that differ from what was put")
    if raw.buffer[:size] != value:  # the plain socket's last get, whole
        raise click.ClickException("the plain-socket baseline returned bytes that differ from the value")
    vclient.delete(*keys)
    return figures, moved


def _get_into(client, key: bytes, moved: Moved) -> None:
    """What the connector does: receive into a pooled buffer, read it, give it back (here the
    read is `moved` counting the bytes and keeping the value's ends)."""
    with client.get_many_into([key])[key] as buf:
        moved.add(buf.view)


@click.command("node")
@option("--runs", type=click.IntRange(1, 100), default=5, help="Repetitions; medians are reported.")
@option("--total", default=256, type=click.IntRange(32, 4096), help="MiB moved per size per run.")
@option(
    "--malloc-tuning/--no-malloc-tuning",
    default=False,
    help="Tune this process's malloc for large buffers first (kvpool's paths need none; valkey-py's "
    "GET, which allocates every value, is faster with it).",
)
@option(
    "--transport",
    type=click.Choice(["tcp", "nixl"]),
    default="tcp",
    help="tcp: the data channel vs a plain socket and Valkey; nixl: NIXL vs raw NIXL and the data channel.",
)
@option(
    "--lmcache",
    metavar="PYTHON",
    default=None,
    help="Also measure LMCache 0.5.6's lm:// server and client, run by this interpreter of a venv "
    "that has LMCache (scripts/install-lmcache.sh makes .venv-lmcache); tcp transport only.",
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of figures.")
def node(
    runs: int, total: int, malloc_tuning: bool, transport: str, lmcache: str | None, as_json: bool
) -> None:
    """Node put/get GB/s vs a plain TCP socket and vs Valkey GET/SET of the same values (or, with
    --transport nixl, vs a raw NIXL READ and kvpool's TCP data channel)."""
    if transport == "nixl":
        if lmcache:
            raise click.UsageError("--lmcache runs with --transport tcp only")
        _nixl(runs, total, malloc_tuning, as_json)
        return
    if lmcache:
        check_lmcache(lmcache)  # before anything starts: a clear error naming the install script
    import valkey

    from kvpool.cachenode import Client
    from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
    from kvpool.cachenode.core.tuning import tune_malloc_for_large_buffers
    from kvpool.cli.devtools.local_servers import kvpool_up, valkey_server

    from .tcp import TcpBaselineClient
    from .tiers_raw import RawValkey

    if malloc_tuning:
        tune_malloc_for_large_buffers()  # only valkey-py allocates what it gets here
    payloads = {name: os.urandom(size) for name, size in SIZES.items()}
    tcp = subprocess.Popen(
        [sys.executable, "-P", "-m", "kvpool.cli.bench.tcp", str(max(SIZES.values()))],
        stdout=subprocess.PIPE,
        text=True,
    )
    samples: dict[str, list[float]] = {}
    bytes_moved: dict[str, int] = {}  # path_size -> bytes over the counted runs
    verified: dict[str, int] = {}  # get path_size -> values whose ends were the value's
    expected: dict[str, int] = {}  # size -> bytes each path should have moved
    expected_values: dict[str, int] = {}
    try:
        tcp_port = int(tcp.stdout.readline())
        with (
            kvpool_up("--memory", f"{2 * total + 64}MiB") as (_, url),
            valkey_server() as vk,
            LMCache(lmcache, payloads) if lmcache else contextlib.nullcontext() as lm,
        ):
            _progress(
                f"node {url}, valkey 127.0.0.1:{vk.port}, tcp baseline 127.0.0.1:{tcp_port}; {runs} runs"
            )
            client = Client(url, transport="grpc")
            raw = TcpBaselineClient(tcp_port, max(SIZES.values()))
            vclient = valkey.Valkey(host="127.0.0.1", port=vk.port)
            vcfg = SharedTiersConfig.from_options(redis_url=f"redis://127.0.0.1:{vk.port}/0").redis
            vraw = RawValkey(vcfg, lanes=1, max_size=max(SIZES.values()))
            for run in range(-1, runs):  # run -1 warms caches, heaps and connections; not counted
                for name, size in SIZES.items():
                    count = max(1, total * MiB // size)
                    figures, moved = _measure(
                        client, raw, vclient, vraw, payloads[name], count, shift=max(run, 0), lm=lm
                    )
                    if run >= 0:
                        for metric, gbps in figures.items():
                            samples.setdefault(f"{metric}_{name}", []).append(gbps)
                            nbytes, right = moved[metric]
                            bytes_moved[f"{metric}_{name}"] = bytes_moved.get(f"{metric}_{name}", 0) + nbytes
                            if right is not None:
                                verified[f"{metric}_{name}"] = verified.get(f"{metric}_{name}", 0) + right
                        expected[name] = expected.get(name, 0) + count * size
                        expected_values[name] = expected_values.get(name, 0) + count
                if run >= 0:
                    _progress(
                        f"run {run + 1}/{runs}: "
                        + ", ".join(f"{k}={v[-1]:.2f}" for k, v in sorted(samples.items()))
                    )
            client.close()
            raw.close()
            vclient.close()
            vraw.close()
    finally:
        tcp.terminate()
        tcp.wait()
    result: dict = {
        "runs": runs,
        "mib_per_run": total,
        "malloc_tuning": malloc_tuning,
        "order": "puts, then gets; each group rotated run by run",
        "bytes_expected": expected,
        "bytes_moved": bytes_moved,
        "values_expected": expected_values,
        "values_verified": verified,
    }
    if lm is not None:
        result["lmcache_version"] = lm.version
    for key, values in sorted(samples.items()):
        result[key] = round(statistics.median(values), 3)
        result[f"spread_{key}"] = _spread(values)
    # Ratios pair each run's figure with the same run's baseline, then take the median: the
    # machine's speed drifts between runs more than the two paths differ within one.
    pairs = {
        "ratio_get_vs_tcp": ("get_gbps", "baseline_tcp_gbps"),
        "ratio_put_vs_tcp": ("put_gbps", "baseline_tcp_put_gbps"),
        "ratio_get_vs_valkey": ("get_gbps", "baseline_valkey_get_gbps"),
        "ratio_put_vs_valkey": ("put_gbps", "baseline_valkey_put_gbps"),
        "ratio_get_vs_valkey_recv_into": ("get_gbps", "baseline_valkey_recv_into_get_gbps"),
    }
    if lm is not None:
        pairs |= {
            "ratio_lmcache_get_vs_tcp": ("lmcache_get_gbps", "baseline_tcp_gbps"),
            "ratio_lmcache_put_vs_tcp": ("lmcache_put_gbps", "baseline_tcp_put_gbps"),
            "ratio_get_vs_lmcache": ("get_gbps", "lmcache_get_gbps"),
            "ratio_put_vs_lmcache": ("put_gbps", "lmcache_put_gbps"),
        }
    for name in SIZES:
        for ratio, (ours, theirs) in pairs.items():
            per_run = [
                a / b for a, b in zip(samples[f"{ours}_{name}"], samples[f"{theirs}_{name}"], strict=True)
            ]
            result[f"{ratio}_{name}"] = round(statistics.median(per_run), 3)
            result[f"spread_{ratio}_{name}"] = _spread(per_run)
    if not as_json:
        for name in SIZES:
            click.echo(
                f"{name}: get {result[f'get_gbps_{name}']:.2f} GB/s (tcp {result[f'baseline_tcp_gbps_{name}']:.2f}, "
                f"x{result[f'ratio_get_vs_tcp_{name}']:.2f}; valkey x{result[f'ratio_get_vs_valkey_{name}']:.2f}) | "
                f"put {result[f'put_gbps_{name}']:.2f} GB/s (tcp {result[f'baseline_tcp_put_gbps_{name}']:.2f}, "
                f"x{result[f'ratio_put_vs_tcp_{name}']:.2f})"
            )
            if lm is not None:
                click.echo(
                    f"{name}: LMCache {lm.version} get x{result[f'ratio_lmcache_get_vs_tcp_{name}']:.2f} "
                    f"put x{result[f'ratio_lmcache_put_vs_tcp_{name}']:.2f} of the same-run socket"
                )
    click.echo(json.dumps(result))


def _nixl(runs: int, total: int, malloc_tuning: bool, as_json: bool) -> None:
    from kvpool.cachenode.core.tuning import tune_malloc_for_large_buffers

    from . import node_nixl

    reason = node_nixl.available()
    if reason:
        raise click.ClickException(f"cannot benchmark NIXL: {reason}")
    if malloc_tuning:
        tune_malloc_for_large_buffers()
    result = {**node_nixl.run(runs, total, _progress), "malloc_tuning": malloc_tuning}
    if not as_json:
        click.echo(
            f"32m over {result['path']}: get {result['get_gbps']:.2f} GB/s "
            f"(raw NIXL {result['baseline_raw_nixl_gbps']:.2f}, x{result['ratio_get_vs_raw_nixl']:.2f}; "
            f"TCP channel {result['baseline_tcp_channel_gbps']:.2f}, x{result['ratio_get_vs_tcp_channel']:.2f}) | "
            f"put {result['put_gbps']:.2f} GB/s (TCP channel x{result['ratio_put_vs_tcp_channel']:.2f})"
        )
    click.echo(json.dumps(result))
