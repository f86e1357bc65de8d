"""Container memory from cache memory: why cache nodes are not OOM-killed.

The production-stack's CacheServer has no capacity settings and dies of OOM; here the container's
memory limit is always the cache budget plus the node process's own overhead, or, when the user
fixes the limit, the cache budget is what fits inside it.

Overhead model (bytes), measured on the build machine and rounded up:
- BASE: the Python process with grpc, numpy, prometheus-client and blake3 imported is 57 MiB RSS;
  gRPC server threads, the HTTP server, allocator fragmentation and the metrics registry bring a
  serving node into the low hundreds. 256 MiB leaves room.
- IN_FLIGHT_VALUES x max value size: receive buffers of concurrent puts that land outside the arena.
- cache / INDEX_DIVISOR: the key index and per-chunk bookkeeping (chunks are ≥ tens of KiB, so
  1/64 is generous).
"""

from __future__ import annotations

MiB = 1024**2
GiB = 1024**3

BASE_OVERHEAD = 256 * MiB
IN_FLIGHT_VALUES = 4
INDEX_DIVISOR = 64
MIN_CACHE = 64 * MiB
DISK_RESERVE_FRACTION = 0.05
"""Share of the volume kept free for the filesystem and half-written files (write, fsync, rename)."""


def overhead(cache_bytes: int, max_value_size: int) -> int:
    return BASE_OVERHEAD + IN_FLIGHT_VALUES * max_value_size + cache_bytes // INDEX_DIVISOR


def container_memory(cache_bytes: int, max_value_size: int) -> int:
    """The memory limit (and request) for a node holding `cache_bytes` in its L1 arena, MiB-aligned."""
    total = cache_bytes + overhead(cache_bytes, max_value_size)
    return -(-total // MiB) * MiB


def cache_within(limit_bytes: int, max_value_size: int) -> int:
    """The largest cache budget whose container memory fits in `limit_bytes` (may be ≤ 0)."""
    usable = limit_bytes - BASE_OVERHEAD - IN_FLIGHT_VALUES * max_value_size
    cache = usable * INDEX_DIVISOR // (INDEX_DIVISOR + 1)
    cache = cache // MiB * MiB
    while cache > 0 and container_memory(cache, max_value_size) > limit_bytes:
        cache -= MiB
    return cache


def disk_budget(volume_bytes: int, max_value_size: int) -> int:
    """The L2 byte budget on a volume of `volume_bytes` (may be ≤ 0 when the volume is too small)."""
    return int(volume_bytes * (1 - DISK_RESERVE_FRACTION)) - max_value_size


def quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity, in Mi when exact (always the case for container_memory)."""
    return f"{n // MiB}Mi" if n % MiB == 0 else str(n)
