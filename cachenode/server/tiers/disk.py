"""L2: one file per record on a local disk, under a hard byte budget, surviving restarts.

Why it is shaped this way:
- each file holds the record frame of record.py (header, key, value) so a read verifies itself;
- writes go to a temporary file in the same directory, are fsynced, then renamed over the final
  name and the directory fsynced: a crash leaves either the old record, the new one, or a stray
  temporary file that the next start removes;
- file names are the key in hex, sharded into 256 directories by a hash of the key, so the index
  is rebuilt from ``os.scandir`` and stat alone, without opening a file;
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
import uuid
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import xxhash

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.record import HEADER_SIZE, RecordError, decode_header, encode_header
from kvpool.cachenode.server.tiers.memory import PinnedCheck, nbytes, validate_watermarks

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".rec"
TEMP_SUFFIX = ".tmp"
SHARDS = 256
READ_PIECE = 1024 * 1024  # read and hash values in pieces that stay in the CPU cache

EvictCallback = Callable[[bytes, memoryview], None]


def shard_of(key: bytes) -> str:
    return f"{xxhash.xxh3_64_intdigest(key) & (SHARDS - 1):02x}"


def record_size(key: bytes, value_len: int) -> int:
    """Bytes a record file takes (what the budget counts)."""
    return HEADER_SIZE + len(key) + value_len


def _write_all(fd: int, buffers: list) -> None:
    """os.writev until every byte is written (writev may write less than asked)."""
    views = [memoryview(b).cast("B") for b in buffers if nbytes(b)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file is a corrupt record."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise RecordError(f"record truncated: {offset + done} bytes of {offset + total}")
        done += n


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
        return os.path.join(self.directory, shard_of(key), key.hex() + RECORD_SUFFIX)

    # -- index ---------------------------------------------------------------------------------

    def rebuild_index(self) -> float:
        """Scan the directory: drop temp files, index records oldest first, enforce the budget.

        Returns the seconds it took (also the ``kvpool_disk_index_rebuild_seconds`` gauge).
        """
        start = time.perf_counter()
        found: list[tuple[float, bytes, int]] = []
        with os.scandir(self.directory) as top:
            shard_dirs = [e.path for e in top if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
        for shard_dir in shard_dirs:
            shard = os.path.basename(shard_dir)
            with os.scandir(shard_dir) as entries:
                for entry in entries:
                    name = entry.name
                    if name.endswith(TEMP_SUFFIX):
                        _unlink(entry.path)  # a write that never reached its rename
                        continue
                    if not name.endswith(RECORD_SUFFIX):
                        continue
                    try:
                        key = bytes.fromhex(name[: -len(RECORD_SUFFIX)])
                    except ValueError:
                        continue
                    if not key or shard_of(key) != shard:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime, key, st.st_size))
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
            value = self._read_record(fd, key, st.st_size)
        except (RecordError, OSError) as exc:
            self._discard_corrupt(key, exc, fd)
            return None
        finally:
            os.close(fd)
        self._m_read.observe(time.perf_counter() - start)
        return value

    def _read_record(self, fd: int, key: bytes, size: int) -> memoryview:
        head_len = HEADER_SIZE + len(key)
        head = bytearray(head_len)
        _read_exact(fd, memoryview(head), 0)
        header = decode_header(head)
        if header.key_len != len(key) or bytes(head[HEADER_SIZE:]) != key:
            raise RecordError("record belongs to another key")
        if header.total_size != size:
            raise RecordError(f"record file is {size} bytes, header says {header.total_size}")
        value = np.empty(header.value_len, dtype=np.uint8)  # not zero-filled, unlike bytearray
        view = memoryview(value)
        if not self._verify:
            _read_exact(fd, view, head_len)
            return view.toreadonly()
        # Hash each piece right after reading it, while it is still in the CPU cache: for large
        # values this costs a fraction of hashing the whole buffer again from memory.
        hasher = xxhash.xxh3_64(key)
        for start in range(0, len(view), READ_PIECE):
            piece = view[start : start + READ_PIECE]
            _read_exact(fd, piece, head_len + start)
            hasher.update(piece)
        if hasher.intdigest() != header.checksum:
            raise RecordError("checksum mismatch")
        return view.toreadonly()

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
                _unlink(path)
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
        shard_dir = os.path.dirname(final)
        temp = os.path.join(shard_dir, f".{key.hex()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
        committed = False
        try:
            self._write_temp(temp, shard_dir, header, value)
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
                _unlink(temp)
                return False
            if self._fsync:
                _fsync_dir(shard_dir)
        except OSError as exc:
            with self._lock:
                if not committed:
                    self._usage -= size
                if self._writing.get(key) is token:
                    del self._writing[key]
                self._publish()
            _unlink(temp)
            self._m_dropped.inc()
            self._mark_degraded(exc)
            return False
        self._m_write.observe(time.perf_counter() - start)
        if self.degraded:
            self._clear_degraded()
        return True

    def _write_temp(self, temp: str, shard_dir: str, header: bytes, value) -> None:
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            os.makedirs(shard_dir, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, [header, value])
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

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
            _unlink(self.path_of(key))  # under the lock, so a later put's rename cannot be undone
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
            _unlink(path)
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
                value = self._read_record(fd, key, os.fstat(fd).st_size)
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("Disk tier could not remove %s: %s", path, exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
