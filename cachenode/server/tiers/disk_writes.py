"""The store's puts on their way to L2: the write-behind queue (core/writebehind.py) with one
writer, plus what the store needs to stay honest about what it holds.

Why one writer: pending writes are keyed, so an overwrite replaces a write that has not started,
and a write already in flight lands before the newer one (FIFO). A delete drops the pending write
and revokes the one in flight: the disk tier asks just before its rename whether the write is
still wanted, so a late write never resurrects a key.

A value can leave the node here: its write dropped (queue full, too large for it) or refused by
the disk (degraded, too small) while L1 no longer has it. `lost(key, value)` is then called
(the store demotes it to its write-back tiers) and `gone(keys)` (the store tells its listener).
Whether L1 still has a value is decided under `lock`, against which the store checks an L1
eviction (`keeps`), so exactly one side sees a value as lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from kvpool.cachenode.core.writebehind import Batch, WriteBehindQueue
from kvpool.cachenode.server.tiers.disk import DiskTier

log = logging.getLogger(__name__)

DROP_WARNING_INTERVAL_S = 10.0
DEFAULT_DISK_QUEUE_BYTES = 256 * 1024**2


class DiskWriteBehind:
    """Background writes into one DiskTier, bounded in bytes (oldest dropped first)."""

    def __init__(
        self,
        disk: DiskTier,
        *,
        queue_bytes: int = DEFAULT_DISK_QUEUE_BYTES,
        in_memory: Callable[[bytes], bool],
        lost: Callable[[bytes, object], None],
        gone: Callable[[list[bytes]], None],
        idle_wait: float = 0.5,
    ) -> None:
        self.disk = disk
        self._in_memory = in_memory
        self._lost = lost
        self._gone = gone
        self.lock = threading.Lock()
        self._queue = WriteBehindQueue(
            disk.name,
            self._write,
            max_items=None,
            max_bytes=queue_bytes,
            workers=1,
            batch_items=1,
            copy_values=False,  # the store owns the buffers it is given
            idle_wait=idle_wait,
            autostart=False,
        )
        self._drop_warned_at = 0.0
        self._drops_unreported = 0

    def start(self) -> None:
        """Start the writer (after the disk index is rebuilt)."""
        self._queue.start()

    # -- the store's side ----------------------------------------------------------------------

    def submit(self, key: bytes, value) -> bool:
        """Queue a write; False when this value was dropped at once (larger than the queue)."""
        with self.lock:
            dropped = self._queue.submit(key, value)
            lost = [(k, v) for k, v in dropped if not self._in_memory(k)]
        if not dropped:
            return True
        self._warn_dropped(len(dropped))
        for old_key, old_value in lost:
            self._lost(old_key, old_value)
        self._gone([k for k, _ in dropped])
        return all(k != key for k, _ in dropped)

    def discard(self, keys: Sequence[bytes]) -> set[bytes]:
        """Drop the pending writes of `keys` and revoke those in flight; returns the keys that
        were pending."""
        with self.lock:
            pending = {k for k in keys if k in self._queue}
            self._queue.discard(keys)
        return pending

    def __contains__(self, key: bytes) -> bool:
        """Pending (not yet taken by the writer)."""
        return key in self._queue

    def keeps(self, key: bytes) -> bool:
        """Pending, being written, or on disk: L1 may let it go without losing it."""
        with self.lock:
            return key in self._queue or self._queue.in_flight(key) or key in self.disk

    def value_of(self, key: bytes):
        return self._queue.value_of(key)

    def size_of(self, key: bytes) -> int | None:
        return self._queue.size_of(key)

    def pending_keys(self) -> list[bytes]:
        return self._queue.pending_keys()

    def stats(self) -> tuple[int, int, int]:
        """(pending writes, their bytes, writes dropped so far)."""
        return self._queue.depth(), self._queue.pending_bytes, self._queue.dropped

    def flush(self, timeout: float) -> bool:
        return self._queue.flush(max(0.0, timeout))

    def close(self) -> None:
        """Stop the writer; what is still pending (flush first) is dropped."""
        self._queue.close()

    # -- the writer ----------------------------------------------------------------------------

    def _write(self, batch: Batch) -> None:
        for key, value in batch:
            written = False
            try:
                written = self.disk.put(key, value, still_wanted=lambda k=key: self._queue.still_wanted(k))
            except Exception:
                log.exception("Disk write of %s failed", key.hex())
            with self.lock:
                current = self._queue.done(key)  # False: a delete revoked it
                # refused by the disk, no newer write pending, gone from L1: the eviction saw it
                # in flight and left it to us (see keeps)
                lost = current and not written and key not in self._queue and not self._in_memory(key)
            if lost:
                self._lost(key, value)
            if current and not written:
                self._gone([key])

    def _warn_dropped(self, dropped: int) -> None:
        """One warning per DROP_WARNING_INTERVAL_S, with the count, not one per put under overload."""
        with self.lock:
            self._drops_unreported += dropped
            now = time.monotonic()
            if now - self._drop_warned_at < DROP_WARNING_INTERVAL_S:
                return
            count, self._drops_unreported = self._drops_unreported, 0
            self._drop_warned_at = now
        log.warning(
            "Disk write queue full: dropped %d pending writes (puts arrive faster than the disk takes them; "
            "see kvpool_tier_dropped_writes_total)",
            count,
        )
