"""L1 in one arena: an LRU of values that live at stable addresses, under a hard byte budget.

NIXL reads and writes a node's values by address, so L1 keeps them in one region registered
once (``arena.Arena``), not one Python object each. Each value is an ``ArenaBuffer``: a numpy
view of its range. The range goes back to the allocator only when the last reference to that
view is gone, so whatever still reads it keeps it alive: the index, a data-channel get being
sent from it (its memoryview holds the view), a pending disk write, a NIXL lease (which holds
the view until the transfer's notification or its TTL). Eviction and overwrite only drop the
index's reference; they never free memory someone reads. ``weakref.finalize`` queues the
freed offset and the next allocation returns it to the allocator, because a finalizer may run
inside a garbage collection that interrupted the allocator itself.

Budget: ``usage`` counts value bytes (as MemoryTier does), kept ≤ ``capacity`` with high/low
watermarks; the arena holds ``capacity`` rounded up to a page, ranges are 64-byte aligned.
When alignment, fragmentation or ranges still being read leave no room for a new value, the
least recently used entries are evicted until it fits. Pinned keys (leases) are never evicted.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from kvpool.cachenode.client.arena import PAGE, Arena, align_up
from kvpool.cachenode.core import metrics
from kvpool.cachenode.server.tiers.memory import nbytes, validate_watermarks

EvictCallback = Callable[[bytes, object], None]
PinnedCheck = Callable[[bytes], bool]
ALIGNMENT = 64


class ArenaBuffer(np.ndarray):
    """A range of a tier's arena (uint8). ``owner``/``offset`` are set only on the view the tier
    handed out; slices and other views of it keep it alive but are not it."""

    owner: ArenaMemoryTier | None = None
    offset: int = -1


class ArenaMemoryTier:
    """Byte-budgeted LRU over one arena. Thread-safe; the same interface as MemoryTier plus
    ``allocate`` (a range to receive a value into, stored later without a copy by ``put``)."""

    def __init__(
        self,
        capacity: int,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        *,
        on_evict: EvictCallback | None = None,
        pinned: PinnedCheck | None = None,
        name: str = "memory",
        arena_path: str | None = None,
    ) -> None:
        """`arena_path`: the arena is that file (created; under /dev/shm), which other processes
        of the host can map; default: anonymous memory."""
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        validate_watermarks(high_watermark, low_watermark)
        self.capacity = capacity
        self.name = name
        self._high = int(capacity * high_watermark)
        self._low = int(capacity * low_watermark)
        self._on_evict = on_evict
        self._pinned = pinned
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[ArenaBuffer, int]] = OrderedDict()
        self._usage = 0
        self.peak_usage = 0
        self.evictions = 0
        self._dead: collections.deque[int] = collections.deque()  # offsets whose views died
        # mmap hands out whole pages anyway: the rounding is slack for alignment waste
        self.arena: Arena | None = (
            Arena(align_up(capacity, PAGE), arena_path, alignment=ALIGNMENT) if capacity > 0 else None
        )
        self._m_usage = metrics.TIER_USAGE.labels(name)
        self._m_entries = metrics.TIER_ENTRIES.labels(name)
        self._m_evictions = metrics.TIER_EVICTIONS.labels(name)
        metrics.TIER_CAPACITY.labels(name).set(capacity)
        self._publish()

    # -- the region, for registration -----------------------------------------------------------

    @property
    def address(self) -> int:
        """Base address of the arena (0 without one): what NIXL registers."""
        return self.arena.region.address if self.arena else 0

    @property
    def arena_bytes(self) -> int:
        return self.arena.capacity if self.arena else 0

    def address_of(self, value: ArenaBuffer) -> int:
        return self.address + value.offset

    @property
    def arena_used(self) -> int:
        """Bytes of the arena in use: stored values plus ranges still read after they left."""
        self._reclaim()
        return self.arena.used_bytes if self.arena else 0

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> ArenaBuffer | None:
        """The stored view (read-only), marked most recently used; None if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def peek(self, key: bytes) -> ArenaBuffer | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def size_of(self, key: bytes) -> int | None:
        """The value's size, or None; taken under the lock, so it orders against evictions."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def usage(self) -> int:
        return self._usage

    def lru_order(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    # -- writes --------------------------------------------------------------------------------

    def allocate(self, size: int) -> ArenaBuffer | None:
        """A writable range of ``size`` bytes, not yet stored (its memory returns to the arena
        when dropped); evicts unpinned LRU entries to make room. None if nothing makes room."""
        if size < 0 or size > self.capacity or self.arena is None:
            return None
        while True:
            self._reclaim()
            offset = self.arena.alloc(max(size, 1))  # an empty value still gets its own range
            if offset is not None:
                return self._view(offset, size)
            with self._lock:
                victim = self._evict_one_locked()
                if victim is not None:
                    self._publish()
            if victim is None:
                return None
            self._notify([victim])
            del victim  # its range frees now unless a reader still holds it

    def put(self, key: bytes, value) -> bool:
        """Store ``value``: a range from ``allocate`` is adopted as is, anything else is copied
        in. False if it is larger than the budget or pinned entries leave no room."""
        size = nbytes(value)
        if size > self.capacity or self.arena is None:
            return False
        if isinstance(value, ArenaBuffer) and value.owner is self:
            stored = value
        else:
            stored = self.allocate(size)
            if stored is None:
                return False
            if size:
                stored[:] = (
                    np.frombuffer(value, dtype=np.uint8) if not isinstance(value, np.ndarray) else value
                )
        stored.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._usage -= old[1]
            evicted = self._evict_locked(self.capacity - size)
            ok = self._usage + size <= self.capacity  # else pinned entries fill the rest
            if ok:
                self._entries[key] = (stored, size)
                self._usage += size
                if self._usage > self._high:
                    evicted += self._evict_locked(self._low, keep=key)
                self.peak_usage = max(self.peak_usage, self._usage)
            self._publish()
        del old
        self._notify(evicted)
        return ok

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

    def close(self) -> None:
        """Drop every entry and unmap the arena once nothing reads it any more."""
        self.clear()
        if self.arena is not None:
            self.arena.close()

    # -- internals -----------------------------------------------------------------------------

    def _view(self, offset: int, size: int) -> ArenaBuffer:
        # Built straight on a memoryview of the range, so its base is no ndarray: numpy then
        # never collapses a derived array's base past this view, and every array, memoryview
        # or slice made from it keeps it (and so the range) alive.
        view = np.ndarray.__new__(ArenaBuffer, (size,), np.uint8, buffer=self.arena.view(offset, size))
        view.owner = self
        view.offset = offset
        weakref.finalize(view, self._dead.append, offset)
        return view

    def _reclaim(self) -> None:
        """Return the ranges of dead views to the allocator (finalizers only queue them)."""
        while True:
            try:
                offset = self._dead.popleft()
            except IndexError:
                return
            self.arena.free(offset)

    def _evict_one_locked(self) -> tuple[bytes, ArenaBuffer] | None:
        """Remove the least recently used unpinned entry; None if every entry is pinned."""
        for key in self._entries:
            if self._pinned is None or not self._pinned(key):
                value, size = self._entries.pop(key)
                self._usage -= size
                self.evictions += 1
                self._m_evictions.inc()
                return key, value
        return None

    def _evict_locked(self, target: int, keep: bytes | None = None) -> list[tuple[bytes, ArenaBuffer]]:
        """Drop least recently used entries until usage <= target (never ``keep``, never a pinned
        key: those move to the recent end, since their reader is about to use them)."""
        evicted: list[tuple[bytes, ArenaBuffer]] = []
        skipped = 0
        while self._usage > target and skipped < len(self._entries):
            key, (value, size) = next(iter(self._entries.items()))
            if key == keep:
                break
            if self._pinned is not None and self._pinned(key):
                self._entries.move_to_end(key)
                skipped += 1
                continue
            del self._entries[key]
            self._usage -= size
            evicted.append((key, value))
        if evicted:
            self.evictions += len(evicted)
            self._m_evictions.inc(len(evicted))
        return evicted

    def _notify(self, evicted: list[tuple[bytes, ArenaBuffer]]) -> None:
        if self._on_evict is None:
            return
        for key, value in evicted:
            self._on_evict(key, value)

    def _publish(self) -> None:
        self._m_usage.set(self._usage)
        self._m_entries.set(len(self._entries))
