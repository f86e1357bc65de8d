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

import re
from decimal import Decimal, InvalidOperation

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


BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
DECIMAL_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
    "P": Decimal(10**15), "E": Decimal(10**18),
}  # fmt: skip
_QUANTITY = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE]([+-]?[0-9]+))?$"
)


def quantity_value(text: object) -> Decimal | None:
    """The value of a Kubernetes quantity (`1Ti`, `1024Gi`, `1.5`, `500m`, `1e3`), None if `text`
    is not one. The API server stores quantities in its own canonical form (`1024Gi` comes back as
    `1Ti`), so quantities are compared by value, never as strings."""
    if isinstance(text, bool) or not isinstance(text, str | int | float | Decimal):
        return None
    match = _QUANTITY.match(str(text).strip())
    if not match:
        return None
    number, suffix, exponent = match.groups()
    try:
        value = Decimal(number)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        return None
    if exponent is not None:
        return value.scaleb(int(exponent))
    if suffix in BINARY_SUFFIXES:
        return value * BINARY_SUFFIXES[suffix]
    return value * DECIMAL_SUFFIXES[suffix or ""]


def same_quantity(a: object, b: object) -> bool:
    """Whether two quantities have the same value, whatever their spelling."""
    va, vb = quantity_value(a), quantity_value(b)
    return va is not None and vb is not None and va == vb


def quantity(n: int) -> str:
    """Bytes as a Kubernetes quantity in the API server's canonical form, so what the operator
    renders is what it reads back: the largest binary suffix that is exact (`10Gi`, not
    `10240Mi`), else the largest exact decimal one (`1500k`), else the plain number."""
    if n and n % 1024 == 0:
        for suffix, unit in reversed(BINARY_SUFFIXES.items()):
            if n % unit == 0:
                return f"{n // unit}{suffix}"
    for suffix in ("E", "P", "T", "G", "M", "k"):
        unit = int(DECIMAL_SUFFIXES[suffix])
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
