"""L2: one file per record on a local disk, under a hard byte budget, surviving restarts.

Why it is shaped this way:
- the files (disk_files.py) are written to a temporary name, fsynced and renamed, and verify
  themselves when read; their names alone rebuild the index at start;
- a failing disk (ENOSPC, EIO, ...) degrades the tier: writes are dropped, reads go on, and
  writes are retried after a back-off;
- an optional ``on_evict(key, value)`` hands evicted records to the store (write-back demotion to
  the shared tiers). The file is opened before it is unlinked under the lock, read back and
  verified after the lock is released, and closed before the write that caused the eviction
  takes its space: the lock is never held for a read, and the bytes on disk stay in budget.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.record import RecordError, encode_header
from kvpool.cachenode.server.tiers.disk_files import (
    fsync_dir,
    read_record,
    record_path,
    record_size,
    scan_records,
    temp_path,
    unlink,
    write_temp,
)
from kvpool.cachenode.server.tiers.memory import PinnedCheck, nbytes, validate_watermarks

log = logging.getLogger(__name__)

EvictCallback = Callable[[bytes, memoryview], None]


class DiskTier:
    """Byte-budgeted LRU of record files. Thread-safe; usage never exceeds ``capacity``."""

    def __init__(
        self,
        directory: str | os.PathLike,
        capacity: int,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        *,
        retry_after: float = 30.0,
        fsync: bool = True,
        verify: bool = True,
        name: str = "disk",
        on_evict: EvictCallback | None = None,
        on_drop: Callable[[list[bytes]], None] | None = None,
        pinned: PinnedCheck | None = None,
    ) -> None:
        """``on_drop(keys)``: told the keys of every eviction (no read-back; cheap)."""
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        validate_watermarks(high_watermark, low_watermark)
        self.directory = os.fspath(directory)
        self._on_evict = on_evict  # called outside the lock with each evicted (verified) value
        self._on_drop = on_drop
        self._pinned = pinned  # a pinned key is never evicted (leases.py)
        self.capacity = capacity
        self.name = name
        self.retry_after = retry_after
        self._fsync = fsync  # False only for benchmarks that need many files fast
        self._verify = verify  # False only to measure what verification costs
        self._high = int(capacity * high_watermark)
        self._low = int(capacity * low_watermark)
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, LRU first
        self._usage = 0  # indexed file sizes + space reserved by writes in progress
        self._writing: dict[bytes, object] = {}  # key -> token of the newest write in progress
        self.peak_usage = 0
        self.evictions = 0
        self.corrupt = 0
        self.degraded = False
        self._retry_at = 0.0
        self.last_rebuild_seconds: float | None = None
        self._m_usage = metrics.TIER_USAGE.labels(name)
        self._m_entries = metrics.TIER_ENTRIES.labels(name)
        self._m_evictions = metrics.TIER_EVICTIONS.labels(name)
        self._m_corrupt = metrics.TIER_CORRUPT.labels(name)
        self._m_degraded = metrics.TIER_DEGRADED.labels(name)
        self._m_dropped = metrics.TIER_DROPPED_WRITES.labels(name)
        self._m_write = metrics.TIER_WRITE_SECONDS.labels(name)
        self._m_read = metrics.TIER_READ_SECONDS.labels(name)
        metrics.TIER_CAPACITY.labels(name).set(capacity)
        self._m_degraded.set(0)
        os.makedirs(self.directory, exist_ok=True)
        self._publish()

    # -- paths ---------------------------------------------------------------------------------

    def path_of(self, key: bytes) -> str:
        return record_path(self.directory, key)

    # -- index ---------------------------------------------------------------------------------

    def rebuild_index(self) -> float:
        """Scan the directory: drop temp files, index records oldest first, enforce the budget.

        Returns the seconds it took (also the ``kvpool_disk_index_rebuild_seconds`` gauge).
        """
        start = time.perf_counter()
        found = scan_records(self.directory)
        found.sort(key=lambda item: item[0])
        with self._lock:
            self._index = OrderedDict((key, size) for _, key, size in found)
            self._usage = sum(size for _, _, size in found)
            doomed = self._evict_locked(self.capacity)
            if self._usage > self._high:
                doomed += self._evict_locked(self._low)
            self.peak_usage = self._usage
            self._publish()
        self._hand_over(doomed)
        elapsed = time.perf_counter() - start
        self.last_rebuild_seconds = elapsed
        metrics.INDEX_REBUILD_SECONDS.set(elapsed)
        log.info(
            "Disk index rebuilt: %d records, %d bytes in %.3f s (%d evicted to fit the budget)",
            len(self._index),
            self._usage,
            elapsed,
            len(doomed),
        )
        return elapsed

    # -- reads ---------------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        return key in self._index

    def size_of(self, key: bytes) -> int | None:
        """The record's file size, or None; taken under the lock, so it orders against evictions."""
        with self._lock:
            return self._index.get(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def usage(self) -> int:
        return self._usage

    def lru_order(self) -> list[bytes]:
        with self._lock:
            return list(self._index)

    def get(self, key: bytes) -> memoryview | None:
        """The verified value in a fresh buffer, or None. A bad record is removed and counted."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        start = time.perf_counter()
        try:
            fd = os.open(self.path_of(key), os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)  # removed behind our back (or by a concurrent delete)
            return None
        except OSError as exc:
            log.warning("Disk tier read failed for %s: %s", key.hex(), exc)
            return None
        try:
            st = os.fstat(fd)
            value = read_record(fd, key, st.st_size, verify=self._verify)
        except (RecordError, OSError) as exc:
            self._discard_corrupt(key, exc, fd)
            return None
        finally:
            os.close(fd)
        self._m_read.observe(time.perf_counter() - start)
        return value

    def _discard_corrupt(self, key: bytes, exc: Exception, fd: int) -> None:
        """Count and remove the bad file, unless a newer write has replaced it meanwhile."""
        log.warning("Disk tier: record %s failed verification (%s); removed", key.hex(), exc)
        self.corrupt += 1
        self._m_corrupt.inc()
        path = self.path_of(key)
        with self._lock:
            try:
                gone = False
                same_file = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                gone, same_file = True, False
            except OSError:
                gone, same_file = False, True
            if same_file:
                unlink(path)
            if same_file or gone:
                size = self._index.pop(key, None)
                if size is not None:
                    self._usage -= size
                    self._publish()

    def _forget(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._usage -= size
                self._publish()

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, value, still_wanted: Callable[[], bool] | None = None) -> bool:
        """Write a record durably; False if it was dropped (too big, tier degraded, disk error).

        ``still_wanted`` is asked under the tier lock just before the rename: the store uses it
        so that a delete racing a late background write does not bring the key back.
        """
        size = record_size(key, nbytes(value))
        if size > self.capacity:
            self._m_dropped.inc()
            return False
        if self.degraded and time.monotonic() < self._retry_at:
            self._m_dropped.inc()
            return False
        header = encode_header(key, value)  # raises RecordError on a bad key, before reserving
        token = object()
        with self._lock:
            doomed = self._evict_locked(self.capacity - size)
            if self._usage + size > self.capacity:  # the rest is reserved by writes in progress
                self._publish()
                overfull = True
            else:
                overfull = False
                self._usage += size  # reserved: the temp file takes this space before the rename
            if self._usage > self._high:
                doomed += self._evict_locked(self._low)
            self.peak_usage = max(self.peak_usage, self._usage)
            if not overfull:
                self._writing[key] = token
            self._publish()
        self._hand_over(doomed)  # before the temp file takes its space
        if overfull:
            self._m_dropped.inc()
            return False
        start = time.perf_counter()
        final = self.path_of(key)
        temp = temp_path(final, key)
        committed = False
        try:
            write_temp(temp, header, value, fsync=self._fsync)
            with self._lock:
                wanted = self._writing.get(key) is token and (still_wanted is None or still_wanted())
                if wanted:
                    os.replace(temp, final)
                    old_size = self._index.pop(key, None)
                    if old_size is not None:
                        self._usage -= old_size
                    self._index[key] = size
                    committed = True
                else:
                    self._usage -= size
                if self._writing.get(key) is token:
                    del self._writing[key]
                self._publish()
            if not committed:
                unlink(temp)
                return False
            if self._fsync:
                fsync_dir(os.path.dirname(final))
        except OSError as exc:
            with self._lock:
                if not committed:
                    self._usage -= size
                if self._writing.get(key) is token:
                    del self._writing[key]
                self._publish()
            unlink(temp)
            self._m_dropped.inc()
            self._mark_degraded(exc)
            return False
        self._m_write.observe(time.perf_counter() - start)
        if self.degraded:
            self._clear_degraded()
        return True

    def delete(self, key: bytes) -> bool:
        """Remove a record; a write of it still in progress will not land."""
        with self._lock:
            if key in self._writing:
                self._writing[key] = None  # cancels the rename of the write in progress
            size = self._index.pop(key, None)
            if size is None:
                return False
            self._usage -= size
            self._publish()
            unlink(self.path_of(key))  # under the lock, so a later put's rename cannot be undone
        return True

    # -- degradation ---------------------------------------------------------------------------

    def _mark_degraded(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + self.retry_after
        if self.degraded:
            return
        self.degraded = True
        self._m_degraded.set(1)
        reason = errno.errorcode.get(exc.errno or 0, "error")
        log.warning(
            "Disk tier %s degraded (%s: %s); dropping writes, serving reads, retrying in %.0f s",
            self.directory,
            reason,
            exc.strerror or exc,
            self.retry_after,
        )

    def _clear_degraded(self) -> None:
        self.degraded = False
        self._m_degraded.set(0)
        log.warning("Disk tier %s recovered; writes resumed", self.directory)

    # -- internals -----------------------------------------------------------------------------

    def _evict_locked(self, target: int) -> list[tuple[bytes, int | None]]:
        """Drop LRU records until usage <= target; returns (key, fd) with fd open on the unlinked
        file when there is an ``on_evict`` to hand it to (else None). Pass it to _hand_over.

        Files are unlinked under the lock, so the index never counts a file another thread could
        still find. An evicted file held open for on_evict keeps its blocks until _hand_over
        closes it, which the caller does before writing its own file: with the store's single
        writer, the bytes on disk stay within the budget.
        """
        doomed: list[tuple[bytes, int | None]] = []
        skipped = 0
        while self._usage > target and skipped < len(self._index):
            key, size = next(iter(self._index.items()))
            if self._pinned is not None and self._pinned(key):
                self._index.move_to_end(key)  # pinned: its reader is about to use it
                skipped += 1
                continue
            del self._index[key]
            path = self.path_of(key)
            fd = None
            if self._on_evict is not None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    log.warning("Disk tier: evicted record %s could not be opened: %s", key.hex(), exc)
            unlink(path)
            self._usage -= size
            doomed.append((key, fd))
        if doomed:
            self.evictions += len(doomed)
            self._m_evictions.inc(len(doomed))
        return doomed

    def _hand_over(self, doomed: list[tuple[bytes, int | None]]) -> None:
        """Read back each evicted record (verified) for ``on_evict``; always closes the fds.

        Called without the lock: a read never stalls other threads' puts and gets.
        """
        if self._on_drop is not None and doomed:
            try:
                self._on_drop([key for key, _ in doomed])
            except Exception:
                log.exception("Disk tier on_drop failed")
        for key, fd in doomed:
            if fd is None:
                continue
            try:
                value = read_record(fd, key, os.fstat(fd).st_size, verify=self._verify)
            except (RecordError, OSError) as exc:
                log.warning("Disk tier: evicted record %s unreadable (%s); not handed over", key.hex(), exc)
                self.corrupt += 1
                self._m_corrupt.inc()
                continue
            finally:
                os.close(fd)
            try:
                if self._on_evict is not None:
                    self._on_evict(key, value)
            except Exception:
                log.exception("Disk tier on_evict failed for %s", key.hex())

    def _publish(self) -> None:
        self._m_usage.set(self._usage)
        self._m_entries.set(len(self._index))
