"""L1: an in-memory LRU of value buffers under a hard byte budget.

The tier takes ownership of the buffers it is given (the data server receives each value into a
fresh buffer) and never copies or mutates them, so a get can be sent straight from the stored
buffer. One lock guards an OrderedDict: every operation is O(1) apart from evicting.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from . import metrics

EvictCallback = Callable[[bytes, object], None]


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


class MemoryTier:
    """Byte-budgeted LRU. Usage never exceeds ``capacity``, whatever the threads do."""

    def __init__(
        self,
        capacity: int,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        *,
        on_evict: EvictCallback | None = None,
        name: str = "memory",
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        validate_watermarks(high_watermark, low_watermark)
        self.capacity = capacity
        self.name = name
        self._high = int(capacity * high_watermark)
        self._low = int(capacity * low_watermark)
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._usage = 0
        self.peak_usage = 0  # highest usage ever seen under the lock; tests check it against capacity
        self.evictions = 0
        self._m_usage = metrics.TIER_USAGE.labels(name)
        self._m_entries = metrics.TIER_ENTRIES.labels(name)
        self._m_evictions = metrics.TIER_EVICTIONS.labels(name)
        metrics.TIER_CAPACITY.labels(name).set(capacity)
        self._publish()

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes):
        """The stored buffer (as given to put), marked most recently used; None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def peek(self, key: bytes):
        """Like get, without touching the LRU order."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def usage(self) -> int:
        return self._usage

    def lru_order(self) -> list[bytes]:
        """Keys from least to most recently used (a snapshot)."""
        with self._lock:
            return list(self._entries)

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, value) -> bool:
        """Store ``value`` (owned from now on); False if it is larger than the whole budget."""
        size = nbytes(value)
        if size > self.capacity:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._usage -= old[1]
            evicted = self._evict_locked(self.capacity - size)
            self._entries[key] = (value, size)
            self._usage += size
            if self._usage > self._high:
                evicted += self._evict_locked(self._low, keep=key)
            self.peak_usage = max(self.peak_usage, self._usage)
            self._publish()
        self._notify(evicted)
        return True

    def delete(self, key: bytes) -> bool:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is None:
                return False
            self._usage -= old[1]
            self._publish()
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._usage = 0
            self._publish()

    # -- internals -----------------------------------------------------------------------------

    def _evict_locked(self, target: int, keep: bytes | None = None) -> list[tuple[bytes, object]]:
        """Drop least recently used entries until usage <= target (never ``keep``)."""
        evicted: list[tuple[bytes, object]] = []
        while self._usage > target and self._entries:
            key, (value, size) = next(iter(self._entries.items()))
            if key == keep:
                break
            del self._entries[key]
            self._usage -= size
            evicted.append((key, value))
        if evicted:
            self.evictions += len(evicted)
            self._m_evictions.inc(len(evicted))
        return evicted

    def _notify(self, evicted: list[tuple[bytes, object]]) -> None:
        if self._on_evict is None:
            return
        for key, value in evicted:
            self._on_evict(key, value)

    def _publish(self) -> None:
        self._m_usage.set(self._usage)
        self._m_entries.set(len(self._entries))
