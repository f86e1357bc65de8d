"""Leases: keys a reader has been promised stay put until it has read them (DESIGN.md §4).

Pure bookkeeping, no I/O, no tiers: the store asks ``is_pinned(key)`` before it evicts. A lease
pins keys with a time to live; it ends when every key is released or when the TTL passes, so a
reader that dies never leaks a pin. Several leases may pin one key (two engines found the same
prefix); the key stays pinned while any of them holds it, and its bytes count once in
``pinned_bytes``.

Uses: the connector's scheduler pins the prefix its lookup found until the worker has loaded it;
a zero-copy transfer (NIXL, shared memory) pins what it reads until the transfer is done.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable

MAX_TTL_S = 600.0


class LeaseTable:
    """Thread-safe. ``clock`` is injectable so tests can move time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._leases: dict[int, tuple[float, set[bytes]]] = {}  # id -> (expiry, keys)
        self._expiries: list[tuple[float, int]] = []  # heap of (expiry, id); stale entries skipped
        self._pins: dict[bytes, list[int]] = {}  # key -> [pin count, size]
        self._pinned_bytes = 0
        self.expired = 0  # leases that ran out their TTL: pinned chunks nobody read in time

    # -- leases --------------------------------------------------------------------------------

    def open(self, ttl_s: float, lease_id: int | None = None) -> int:
        """A new lease holding nothing yet; pin keys into it with ``pin``. ``lease_id`` names it
        (a pool client uses one id on every node); an id that is already live is joined, its
        expiry pushed out to at least ``ttl_s`` from now."""
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"lease TTL must be in (0, {MAX_TTL_S:.0f}] seconds, got {ttl_s}")
        with self._lock:
            self._sweep_locked()
            expiry = self._clock() + ttl_s
            if lease_id:
                live = self._leases.get(lease_id)
                if live is not None:
                    if expiry > live[0]:
                        self._leases[lease_id] = (expiry, live[1])
                        heapq.heappush(self._expiries, (expiry, lease_id))
                    return lease_id
            else:
                lease_id = next(self._ids)
            self._leases[lease_id] = (expiry, set())
            heapq.heappush(self._expiries, (expiry, lease_id))
            return lease_id

    def pin(self, lease_id: int, key: bytes, size: int) -> bool:
        """Add ``key`` (``size`` bytes) to a live lease; False if the lease is gone."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or key in lease[1]:
                return lease is not None
            lease[1].add(key)
            entry = self._pins.get(key)
            if entry is None:
                self._pins[key] = [1, size]
                self._pinned_bytes += size
            else:
                entry[0] += 1
            return True

    def release(self, lease_id: int, keys: Iterable[bytes] | None = None) -> int:
        """Unpin ``keys`` of the lease (all when None); returns how many were unpinned.

        The lease ends when it holds nothing more. Unknown leases and keys are ignored: a late
        release after expiry is normal, not an error.
        """
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return 0
            held = lease[1]
            doomed = set(held) if keys is None else held.intersection(keys)
            for key in doomed:
                held.discard(key)
                self._unpin_locked(key)
            if not held:
                del self._leases[lease_id]
            self._sweep_locked()
            return len(doomed)

    def clear(self) -> None:
        """End every lease (the store is closing)."""
        with self._lock:
            self._leases.clear()
            self._expiries.clear()
            self._pins.clear()
            self._pinned_bytes = 0

    def sweep(self) -> int:
        """End every expired lease now; returns how many ended."""
        with self._lock:
            return self._sweep_locked()

    # -- queries -------------------------------------------------------------------------------

    def is_pinned(self, key: bytes) -> bool:
        with self._lock:
            if self._expiries and self._expiries[0][0] <= self._clock():
                self._sweep_locked()
            return key in self._pins

    def pinned_bytes(self) -> int:
        with self._lock:
            self._sweep_locked()
            return self._pinned_bytes

    def __len__(self) -> int:
        """Live leases."""
        with self._lock:
            self._sweep_locked()
            return len(self._leases)

    # -- internals -----------------------------------------------------------------------------

    def _unpin_locked(self, key: bytes) -> None:
        entry = self._pins[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._pins[key]
            self._pinned_bytes -= entry[1]

    def _sweep_locked(self) -> int:
        now = self._clock()
        ended = 0
        while self._expiries and self._expiries[0][0] <= now:
            expiry, lease_id = heapq.heappop(self._expiries)
            lease = self._leases.get(lease_id)
            if lease is None or lease[0] != expiry:
                continue  # released earlier
            for key in lease[1]:
                self._unpin_locked(key)
            del self._leases[lease_id]
            ended += 1
        self.expired += ended
        return ended
