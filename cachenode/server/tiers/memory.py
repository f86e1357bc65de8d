"""What the local tiers (L1 in arena_memory.py, L2 in disk.py) share: how a value's size is
counted, its read-only view, the watermark check and the callback types."""

from __future__ import annotations

from collections.abc import Callable

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
