"""What the local tiers (L1 in arena_memory.py, L2 in disk.py) share: how a value's size is
counted, its read-only view, the watermark check, the callback types, and how a received put
request hands its values over (``drain``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

EvictCallback = Callable[[bytes, object], None]
PinnedCheck = Callable[[bytes], bool]


def nbytes(value) -> int:
    """Size of a bytes-like value as the budget counts it."""
    return memoryview(value).nbytes


def readonly_view(value) -> memoryview:
    """A flat, read-only byte view of a stored buffer (no copy)."""
    view = memoryview(value)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view.toreadonly()


def validate_watermarks(high: float, low: float) -> None:
    if not 0 < low <= high <= 1:
        raise ValueError(f"watermarks must satisfy 0 < low <= high <= 1, got low={low} high={high}")


def drain(pairs: list[tuple[bytes, object]]) -> Iterator[tuple[bytes, object]]:
    """Yield the pairs of a received put request from the front, dropping the list's reference to
    each as it goes. A request larger than L1 received its first values into L1 ranges and the
    rest elsewhere; storing a later value evicts an earlier one, and an evicted range returns to
    the arena only once nothing refers to it: were the request's list still holding the earlier
    values, every eviction would free nothing and the request would leave L1 empty."""
    pairs.reverse()
    while pairs:
        yield pairs.pop()
