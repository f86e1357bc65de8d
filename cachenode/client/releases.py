"""Lease releases no pool member could take yet, kept to be sent again.

A release that reached no member (all down or failing) is sent again with the client's next
release or lookup, once one answers, so a lease ends when its reader is done, not at its
expiry. Bounded: the oldest go first (they expire on their own), and none is kept past the
longest lease a node grants.
"""

from __future__ import annotations

import threading
import time

from kvpool.cachenode.core.leases import MAX_TTL_S

MAX_DEFERRED_RELEASES = 1024

# (monotonic time of the first try, lease id, keys or None for the whole lease)
Deferred = tuple[float, int, list[bytes] | None]


class DeferredReleases:
    """Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[Deferred] = []

    def defer(self, lease_id: int, keys: list[bytes] | None, at: float | None = None) -> None:
        with self._lock:
            self._waiting.append((time.monotonic() if at is None else at, lease_id, keys))
            del self._waiting[:-MAX_DEFERRED_RELEASES]

    def take_due(self) -> list[Deferred]:
        """Every waiting release not yet expired on any node; the caller defers again what fails."""
        with self._lock:
            if not self._waiting:
                return []
            due, self._waiting = self._waiting, []
        now = time.monotonic()
        return [d for d in due if now - d[0] <= MAX_TTL_S]
