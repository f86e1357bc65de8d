"""`kvpool bench disk`: what checksum verification costs on the get path, and how long the L2 index
rebuild takes.

Prints, for 4 MiB and 32 MiB values:
- memcpy GB/s (numpy copy: what an L1 get that moves the bytes costs) and xxh3-64 GB/s, and the
  share of get throughput a verify would take on that path;
- disk-tier get GB/s with the page cache warm, with and without checksum verification, and the
  throughput lost to verification;
and the time to rebuild the disk index of N small records (page cache and dentry cache warm).
With --json, one JSON line of the same figures instead of the table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time

import click
import numpy as np
import xxhash

from kvpool.cachenode.server.tiers.disk import DiskTier

from ..options import option

MiB = 1024**2


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_path(size: int, repeat: int) -> dict:
    src = np.frombuffer(os.urandom(size), dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t_copy = _median_time(lambda: np.copyto(dst, src), repeat)
    view = memoryview(src)
    t_hash = _median_time(lambda: xxhash.xxh3_64_intdigest(view), repeat)
    dst[:] = 0
    np.copyto(dst, src)  # once more after clearing, to show the copy moves the bytes
    return {
        "memcpy_bytes_verified": size if np.array_equal(dst, src) else 0,
        "memcpy_gbps": _gbps(size, t_copy),
        "xxh3_gbps": _gbps(size, t_hash),
        # a get that moves the bytes once at memcpy speed, plus one verify pass
        "cost_pct": 100 * t_hash / (t_copy + t_hash),
    }


def socket_path(size: int, repeat: int) -> dict:
    """A plain loopback socket moving the value once: what a network get is bounded by. Also the
    bytes it received and whether the last value received equals the one sent."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
    src = memoryview(os.urandom(size))
    dst = memoryview(bytearray(size))

    def sender():
        for _ in range(repeat + 1):
            a.sendall(src)

    thread = threading.Thread(target=sender)
    thread.start()
    times = []
    received = 0
    for _ in range(repeat + 1):
        start = time.perf_counter()
        got = 0
        while got < size:
            n = b.recv_into(dst[got:])
            if n == 0:
                raise ConnectionError("the sender closed early")
            got += n
        times.append(time.perf_counter() - start)
        received += got
    thread.join()
    a.close()
    b.close()
    return {
        "gbps": _gbps(size, statistics.median(times[1:])),
        "bytes_received": received,
        "bytes_expected": (repeat + 1) * size,
        "verified": dst == src,
    }


def disk_path(directory: str, size: int, count: int, rounds: int) -> dict:
    tier = DiskTier(directory, 2 * count * size, fsync=False, name=f"bench-{size}")
    keys = [b"bench-%d-%d" % (size, i) for i in range(count)]
    for key in keys:
        tier.put(key, os.urandom(size))
    plain = DiskTier(directory, tier.capacity, verify=False, name=f"bench-nv-{size}")
    plain.rebuild_index()

    moved = {tier.name: 0, plain.name: 0}

    def read_all(t: DiskTier) -> float:
        start = time.perf_counter()
        for key in keys:
            value = t.get(key)
            if value is None:
                raise click.ClickException(f"{t.name}: a stored value is missing")
            moved[t.name] += memoryview(value).nbytes
        return time.perf_counter() - start

    read_all(tier)  # warm the page cache
    moved[tier.name] = 0
    verified, unverified = [], []
    for r in range(rounds):  # interleaved, the leader alternating, so drift hits both alike
        for t, times in ((tier, verified), (plain, unverified))[:: 1 if r % 2 == 0 else -1]:
            times.append(read_all(t))
    total = size * count
    g_verify = _gbps(total, statistics.median(verified))
    g_plain = _gbps(total, statistics.median(unverified))
    return {
        "get_gbps_verify": g_verify,
        "get_gbps_no_verify": g_plain,
        "cost_pct": 100 * (1 - g_verify / g_plain),
        "bytes_expected": rounds * total,
        "bytes_verify": moved[tier.name],
        "bytes_no_verify": moved[plain.name],
    }


def rebuild(directory: str, records: int) -> dict:
    writer = DiskTier(directory, records * 1024, fsync=False, name="bench-rebuild-w")  # 1 KiB each
    start = time.perf_counter()
    for i in range(records):
        writer.put(b"rebuild-%08d" % i, b"v" * 64)
    write_s = time.perf_counter() - start
    times = []
    for _ in range(3):
        fresh = DiskTier(directory, records * 1024, name="bench-rebuild")
        times.append(fresh.rebuild_index())
        assert len(fresh) == records
    return {"records": records, "write_s": write_s, "rebuild_s": statistics.median(times)}


SIZES = ((4 * MiB, 32), (32 * MiB, 8))  # (value size, values)


@click.command("disk")
@option(
    "--records",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Small records written for the index rebuild.",
)
@option("--dir", "directory", default=None, help="Where to put the files (default: a temp dir).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of figures.")
def disk(records: int, directory: str | None, as_json: bool) -> None:
    """Disk-tier get GB/s with and without checksum verification beside memcpy, xxh3 and a socket; index rebuild time."""
    logging.basicConfig(level=logging.WARNING)
    base = tempfile.mkdtemp(prefix="kvpool-bench-", dir=directory)
    result: dict = {"sizes": {}}
    try:
        if not as_json:
            click.echo(
                "value   memcpy  xxh3   cost vs memcpy | socket  cost vs socket get "
                "| disk get verify / none  cost   (GB/s)"
            )
        for size, count in SIZES:
            mem = memory_path(size, repeat=20)
            sock_path = socket_path(size, repeat=10)
            sock = sock_path["gbps"]
            sock_cost = 100 * (1 / mem["xxh3_gbps"]) / (1 / sock + 1 / mem["xxh3_gbps"])
            disk = disk_path(os.path.join(base, f"get-{size}"), size, count, rounds=5)
            if not as_json:
                click.echo(
                    f"{size // MiB:>3} MiB  {mem['memcpy_gbps']:>6.1f}  {mem['xxh3_gbps']:>5.1f}  "
                    f"{mem['cost_pct']:>13.1f}% | {sock:>6.2f}  {sock_cost:>17.1f}% "
                    f"| {disk['get_gbps_verify']:>15.2f} / {disk['get_gbps_no_verify']:<5.2f} {disk['cost_pct']:>5.1f}%"
                )
            result["sizes"][f"{size // MiB}MiB"] = {
                "memcpy_gbps": round(mem["memcpy_gbps"], 3),
                "xxh3_gbps": round(mem["xxh3_gbps"], 3),
                "verify_cost_vs_memcpy_pct": round(mem["cost_pct"], 2),
                "socket_gbps": round(sock, 3),
                "verify_cost_vs_socket_get_pct": round(sock_cost, 2),
                "disk_get_gbps_verify": round(disk["get_gbps_verify"], 3),
                "disk_get_gbps_no_verify": round(disk["get_gbps_no_verify"], 3),
                "verify_cost_disk_get_pct": round(disk["cost_pct"], 2),
                "values": count,
                # what each baseline was seen to move
                "memcpy_bytes_verified": mem["memcpy_bytes_verified"],
                "socket_bytes_received": sock_path["bytes_received"],
                "socket_bytes_expected": sock_path["bytes_expected"],
                "socket_last_value_equal": sock_path["verified"],
                "disk_get_bytes_expected": disk["bytes_expected"],
                "disk_get_bytes_verify": disk["bytes_verify"],
                "disk_get_bytes_no_verify": disk["bytes_no_verify"],
            }
            shutil.rmtree(os.path.join(base, f"get-{size}"))
        r = rebuild(os.path.join(base, "rebuild"), records)
        result["rebuild"] = {
            "records": r["records"],
            "rebuild_s": round(r["rebuild_s"], 4),
            "rebuild_us_per_record": round(r["rebuild_s"] / r["records"] * 1e6, 2),
            "write_s": round(r["write_s"], 3),
        }
        if not as_json:
            click.echo(
                f"index rebuild: {r['records']} records in {r['rebuild_s']:.3f} s "
                f"({r['rebuild_s'] / r['records'] * 1e6:.1f} us/record; writing them took {r['write_s']:.1f} s)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(result))
