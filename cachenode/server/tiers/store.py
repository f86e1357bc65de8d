"""The node's tiered store: L1 memory, L2 disk, then the shared tiers (Redis/Valkey, S3).

The one object the gRPC and data servers call. A put is acknowledged once it is in L1; the disk
write happens on one background writer thread (on disk within about a second), and each shared
tier gets the value through its own background queue. A get walks L1, the pending disk writes,
L2 (promoting hits into L1), then the shared tiers in order with one batched call for all keys
still missing (promoting hits into L1 and, in the background, into L2).

Ordering rules that keep the disk honest:
- pending disk writes are keyed, so an overwrite replaces a write that has not started and a
  write already in flight lands before the newer one (one writer, FIFO);
- a delete removes the pending write and revokes the one in flight: the disk tier asks the store
  just before its rename whether the write is still wanted, so a late write never resurrects.

Shared-tier policy (tiers.PolicyTier; tiers without it are plain write-through):
- write-through: every put is queued for each shared tier at once (`submit_put`); evictions
  only drop.
- write-back: `submit_put` does nothing (the tier ignores it); a value goes to the shared tiers
  (`demote`, which only enqueues) when it leaves the last local tier: an L2 eviction (the record
  is read back from its file, see DiskTier.on_evict) or, without a disk tier, an L1 eviction or a
  put too large for L1. With a disk tier an L1 eviction needs nothing while the value is on disk
  or on its way there; a value whose disk write is dropped (queue full, disk degraded or too
  small) and that is no longer in L1 is demoted right then, so a value leaves the node only
  through a shared tier. Values still local at close() stay local: on disk they survive a
  restart, in L1 alone (no disk tier) they are lost with the process.
- `promote_on_read` False: a hit from that tier is served but not copied into L1/L2.

Watching what is held (`watch`): a listener (the lookup service's `Publisher`) hears `admitted(keys)`
once a key is held locally (L1, a pending disk write or L2) and `evicted(keys)` once it is not any
more (evicted from the last local tier, deleted, its disk write dropped). `local_keys()` is the
snapshot those events keep current. A key evicted and put again by two threads at once may be
reported in the wrong order; the index then lacks a key for a while (a missed hit, never wrong KV).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.leases import LeaseTable
from kvpool.cachenode.core.validation import check_key
from kvpool.cachenode.server.tiers.arena_memory import ArenaBuffer, ArenaMemoryTier, NoRoom
from kvpool.cachenode.server.tiers.disk import DiskTier
from kvpool.cachenode.server.tiers.memory import nbytes, readonly_view
from kvpool.cachenode.server.tiers.shared import PolicyTier, SharedTier

log = logging.getLogger(__name__)

MEMORY = "memory"
DISK = "disk"
DROP_WARNING_INTERVAL_S = 10.0
DEFAULT_DISK_QUEUE_BYTES = 256 * 1024**2


def wants_demotions(tier: SharedTier) -> bool:
    """Whether the store must hand evictions to `tier`: a PolicyTier not known to write through.

    A tier whose policy cannot be read gets demotions (its `demote` decides); a write-through
    tier does not, so the store skips reading evicted disk records back for nothing.
    """
    if not isinstance(tier, PolicyTier):
        return False
    return getattr(getattr(tier, "policy", None), "write", None) != "through"


class HoldingsListener(Protocol):
    """Told what a store starts and stops holding (lookup.Publisher is one); must not block."""

    def admitted(self, keys: Iterable[bytes]) -> None: ...
    def evicted(self, keys: Iterable[bytes]) -> None: ...


class _Pending:
    """A disk write waiting for the writer thread."""

    __slots__ = ("seq", "size", "value")

    def __init__(self, seq: int, value, size: int) -> None:
        self.seq = seq
        self.value = value
        self.size = size


class TieredStore:
    """L1 → L2 → shared tiers, with background write-through. Thread-safe."""

    def __init__(
        self,
        memory_bytes: int,
        disk_dir: str | None = None,
        disk_bytes: int = 0,
        *,
        shared_tiers: Sequence[SharedTier] = (),
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        disk_flush_interval: float = 0.5,
        disk_queue_bytes: int = DEFAULT_DISK_QUEUE_BYTES,
        disk_retry_after: float = 30.0,
        arena_path: str | None = None,
    ) -> None:
        """`arena_path`: keep L1 in a file there (under /dev/shm) that other processes map."""
        self.leases = LeaseTable()
        self._listener: HoldingsListener | None = None
        self._pinned_published = 0
        self._pins_lock = threading.Lock()
        self.shared: tuple[SharedTier, ...] = tuple(shared_tiers)
        self._demote_to: tuple[SharedTier, ...] = tuple(t for t in self.shared if wants_demotions(t))
        demoting = bool(self._demote_to)
        self.disk: DiskTier | None = None
        if disk_dir is not None and disk_bytes > 0:
            self.disk = DiskTier(
                disk_dir,
                disk_bytes,
                high_watermark,
                low_watermark,
                retry_after=disk_retry_after,
                name=DISK,
                on_evict=self._demote if demoting else None,
                on_drop=self._dropped,
                pinned=self.leases.is_pinned,
            )
        self.memory = ArenaMemoryTier(
            memory_bytes,
            high_watermark,
            low_watermark,
            name=MEMORY,
            on_evict=self._on_memory_evict,
            pinned=self.leases.is_pinned,
            arena_path=arena_path,
        )
        self.disk_flush_interval = disk_flush_interval
        self.disk_queue_bytes = disk_queue_bytes
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._pending_bytes = 0
        self._inflight: dict[bytes, int] = {}  # key -> seq of the write the writer is doing
        self._writer_busy = False
        self._seq = itertools.count(1)
        self._deletes = 0  # bumped by every delete; a get that overlaps one does not promote
        self._closing = False
        self._closed = False
        self._writer: threading.Thread | None = None
        self.dropped_writes = 0
        self._drop_warned_at = 0.0
        self._drops_unreported = 0
        self.demotions = 0  # values handed to write-back tiers (evicted from the last local tier)
        names = [MEMORY, DISK, *(t.name for t in self.shared)]
        self._hits = dict.fromkeys(names, 0)
        self._misses = dict.fromkeys(names, 0)
        self._m_queue = metrics.TIER_QUEUE_DEPTH.labels(DISK)
        self._m_dropped = metrics.TIER_DROPPED_WRITES.labels(DISK)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TieredStore:
        """Rebuild the disk index (may take seconds), start the writer, then report ready."""
        if self._ready.is_set():
            return self
        if self.disk is not None:
            self.disk.rebuild_index()
            self._writer = threading.Thread(target=self._write_loop, name="kvpool-disk-writer", daemon=True)
            self._writer.start()
        self._ready.set()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def __enter__(self) -> TieredStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until pending disk writes are on disk and shared tiers drained; False on timeout."""
        deadline = time.monotonic() + timeout
        ok = True
        if self.disk is not None:
            with self._cond:
                ok = self._cond.wait_for(
                    lambda: not self._pending and not self._writer_busy, timeout=max(0.0, timeout)
                )
        for tier in self.shared:
            try:
                ok = tier.flush(max(0.0, deadline - time.monotonic())) and ok
            except Exception:
                log.exception("Shared tier %s failed to flush", tier.name)
                ok = False
        return ok

    def close(self, timeout: float = 10.0) -> None:
        """Flush, stop the writer and close the shared tiers. Idempotent."""
        if self._closed:
            return
        if self.ready:
            self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout)
        for tier in self.shared:
            try:
                tier.close()
            except Exception:
                log.exception("Shared tier %s failed to close", tier.name)
        self.leases.clear()
        self._publish_pins()
        self.memory.close()
        self._closed = True
        self._ready.clear()

    # -- writes --------------------------------------------------------------------------------

    def put(self, key: bytes, value) -> bool:
        """Store a value (the store owns the buffer from now on). False if no tier took it."""
        key = check_key(key)
        in_memory = self.memory.put(key, value)
        queued = self._enqueue_disk(key, value)
        for tier in self.shared:
            try:
                tier.submit_put(key, value)  # a write-back tier ignores it
            except Exception:
                log.exception("Shared tier %s refused a put", tier.name)
        if not in_memory and not queued:
            self._demote(key, value)  # no local tier takes it: it is evicted at once
        elif self._listener is not None:
            self._listener.admitted([key])
        return in_memory or queued or bool(self.shared)

    def put_many(self, items: Mapping[bytes, object] | Iterable[tuple[bytes, object]]) -> int:
        """Put each pair; returns how many were taken by some tier."""
        pairs = items.items() if isinstance(items, Mapping) else items
        return sum(self.put(key, value) for key, value in pairs)

    def delete(self, keys: Iterable[bytes]) -> int:
        """Remove keys from every tier, pending disk writes included; returns how many were held."""
        keys = [check_key(k) for k in keys]
        held = set()
        with self._cond:
            self._deletes += 1
            for key in keys:
                entry = self._pending.pop(key, None)
                if entry is not None:
                    self._pending_bytes -= entry.size
                    held.add(key)
                self._inflight.pop(key, None)  # revokes the write in flight (see still_wanted)
            self._m_queue.set(len(self._pending))
        for key in keys:
            if self.memory.delete(key):
                held.add(key)
            if self.disk is not None and self.disk.delete(key):
                held.add(key)
        for tier in self.shared:
            try:
                tier.delete(keys)
            except Exception:
                log.exception("Shared tier %s failed to delete", tier.name)
        if held:
            self._gone(held)
        return len(held)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, key: bytes) -> memoryview | None:
        """A read-only view of the value (do not mutate it), or None."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[memoryview | None]:
        keys = [check_key(k) for k in keys]
        deletes_before = self._deletes
        results: list[memoryview | None] = [None] * len(keys)
        missing: list[int] = []
        for i, key in enumerate(keys):
            value = self.memory.get(key)
            if value is None:
                value = self._pending_value(key)
            if value is None:
                missing.append(i)
            else:
                results[i] = readonly_view(value)
        self._count(MEMORY, len(keys) - len(missing), len(missing))

        if missing and self.disk is not None and self.ready:
            still: list[int] = []
            for i in missing:
                value = self.disk.get(keys[i])
                if value is None:
                    still.append(i)
                else:
                    results[i] = value
                    self._promote(keys[i], value, deletes_before, to_disk=False)
            self._count(DISK, len(missing) - len(still), len(still))
            missing = still

        for tier in self.shared:
            if not missing:
                break
            asked = [keys[i] for i in missing]
            try:
                values = tier.get_many(asked)
            except Exception:
                log.exception("Shared tier %s failed a get", tier.name)
                values = [None] * len(asked)
            still = []
            for i, value in zip(missing, values, strict=True):
                if value is None:
                    still.append(i)
                else:
                    results[i] = readonly_view(value)
                    if getattr(tier, "promote_on_read", True):
                        self._promote(keys[i], value, deletes_before, to_disk=True)
            # the shared tier exports its own hit/miss metrics; the store only keeps them for stats()
            self._count(tier.name, len(missing) - len(still), len(still), export=False)
            missing = still
        return results

    def contains(self, key: bytes) -> bool:
        """Held in L1, pending for L2, or in L2 (shared tiers are not asked)."""
        key = check_key(key)
        return self._held_locally(key)

    def local_keys(self) -> Iterator[bytes]:
        """Every key held locally (L1, pending disk writes, L2), each once: the snapshot that a
        `watch` listener's events keep current."""
        seen = set(self.memory.lru_order())
        yield from seen
        with self._cond:
            pending = [k for k in self._pending if k not in seen]
        seen.update(pending)
        yield from pending
        if self.disk is not None:
            yield from (k for k in self.disk.lru_order() if k not in seen)

    def watch(self, listener: HoldingsListener | None) -> None:
        """Tell `listener` what starts and stops being held locally from now on (None: stop)."""
        self._listener = listener

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held locally (L1, pending, L2); shared tiers not asked."""
        count = 0
        for key in keys:
            if not self._held_locally(check_key(key)):
                break
            count += 1
        return count

    # -- leases (leases.py): a reader's promise that what it found stays until it has read it ----

    def lease_prefix(
        self, keys: Sequence[bytes], ttl_s: float, lease_id: int | None = None
    ) -> tuple[int, int]:
        """Like prefix_hits, and pin the leading keys found in L1/L2 for ``ttl_s`` seconds so
        that no eviction removes them before the reader's get. Returns (count, lease id); the
        lease id is 0 when nothing was found. Release with ``release``; it also expires.
        ``lease_id`` names the lease (see LeaseTable.open)."""
        keys = [check_key(k) for k in keys]
        lease_id = self.leases.open(ttl_s, lease_id)
        count = 0
        for key in keys:
            size = self._local_size(key)
            if size is None:
                break
            self.leases.pin(lease_id, key, size)
            # Checked again now that it is pinned: an eviction that decided before the pin has
            # run to completion by the time size_of gets the tier lock, and one after it skips it.
            if self._local_size(key) is None:
                self.leases.release(lease_id, [key])
                break
            count += 1
        if count == 0:
            self.leases.release(lease_id, ())  # ends the lease if it holds nothing (it may be joined)
            lease_id = 0
        self._publish_pins()
        return count, lease_id

    def open_lease(self, pins: Sequence[tuple[bytes, int]], ttl_s: float) -> int:
        """A lease pinning each (key, size) for ``ttl_s`` seconds: pinned keys are never evicted.
        End it with ``release``; it also expires."""
        lease_id = self.leases.open(ttl_s)
        for key, size in pins:
            self.leases.pin(lease_id, key, size)
        self._publish_pins()
        return lease_id

    def release(self, lease_id: int, keys: Iterable[bytes] | None = None) -> int:
        """Unpin ``keys`` of a lease (all when None); unknown or expired leases are ignored."""
        n = self.leases.release(lease_id, None if keys is None else [check_key(k) for k in keys])
        self._publish_pins()
        return n

    def _local_size(self, key: bytes) -> int | None:
        size = self.memory.size_of(key)
        if size is None:
            with self._cond:
                entry = self._pending.get(key)
                size = None if entry is None else entry.size
        if size is None and self.disk is not None:
            size = self.disk.size_of(key)
        return size

    def _publish_pins(self) -> None:
        """Move the process-wide pinned-bytes gauge by this store's change (several stores may
        share a process, so the store adds its delta rather than setting the value)."""
        with self._pins_lock:
            now = self.leases.pinned_bytes()
            delta, self._pinned_published = now - self._pinned_published, now
        if delta:
            metrics.PINNED_BYTES.inc(delta)

    # -- zero-copy access to L1 (arena_memory.py) ----------------------------------------------

    def allocate(self, size: int) -> ArenaBuffer | None:
        """A writable L1 range to receive a value into; ``put`` then stores it without a copy.
        None when L1 cannot make room (the caller receives into its own buffer instead)."""
        return self.memory.allocate(size)

    def hold_many(self, keys: Sequence[bytes]) -> list[ArenaBuffer | None]:
        """Like get_many, but every value found is an L1 range (one held only by the caller when
        L1 does not keep it): a peer can read it by address while the caller holds it.
        Raises NoRoom when a value found below L1 cannot get a range."""
        held: list[ArenaBuffer | None] = []
        for view in self.get_many(keys):
            if view is None:
                held.append(None)
                continue
            owner = view.obj
            if isinstance(owner, ArenaBuffer) and owner.owner is self.memory:
                held.append(owner)
                continue
            copy = self.memory.allocate(view.nbytes)
            if copy is None:
                raise NoRoom("L1 has no room for a value read from a lower tier")
            copy[:] = view
            held.append(copy)
        return held

    def _local_stats(self, name: str, tier: ArenaMemoryTier | DiskTier) -> dict:
        return {
            "capacity": tier.capacity,
            "used": tier.usage,
            "entries": len(tier),
            "hits": self._hits[name],
            "misses": self._misses[name],
            "evictions": tier.evictions,
        }

    def stats(self) -> dict:
        tiers: dict[str, dict] = {
            MEMORY: {
                **self._local_stats(MEMORY, self.memory),
                "degraded": False,
                "arena_used": self.memory.arena_used,
            }
        }
        if self.disk is not None:
            tiers[DISK] = {
                **self._local_stats(DISK, self.disk),
                "degraded": self.disk.degraded,
                "corrupt": self.disk.corrupt,
            }
        for tier in self.shared:
            tiers[tier.name] = self._shared_stats(tier)
        with self._cond:
            pending, pending_bytes = len(self._pending), self._pending_bytes
        self._publish_pins()
        return {
            "ready": self.ready,
            "pinned_bytes": self._pinned_published,
            "leases": len(self.leases),
            "leases_expired": self.leases.expired,
            "tiers": tiers,
            "pending_writes": pending,
            "pending_write_bytes": pending_bytes,
            "dropped_writes": self.dropped_writes,
            "demotions": self.demotions,
        }

    def _shared_stats(self, tier: SharedTier) -> dict:
        """The store's hit counts plus what the tier reports (breaker, queue depth, written,
        dropped); degraded means its breaker is not closed."""
        entry: dict = {"capacity": None, "used": None, "entries": None, "evictions": None, "degraded": None}
        if isinstance(tier, PolicyTier):
            entry["write"] = "back" if tier in self._demote_to else "through"
            entry["promote"] = bool(tier.promote_on_read)
        stats = getattr(tier, "stats", None)
        if callable(stats):
            try:
                entry.update(stats())
            except Exception:
                log.exception("Shared tier %s failed to report stats", tier.name)
        if "breaker" in entry:
            entry["degraded"] = entry["breaker"] != "closed"
        entry["hits"] = self._hits[tier.name]
        entry["misses"] = self._misses[tier.name]
        return entry

    # -- internals -----------------------------------------------------------------------------

    def _held_locally(self, key: bytes) -> bool:
        if self.memory.contains(key) or key in self._pending:
            return True
        return self.disk is not None and self.disk.contains(key)

    def _pending_value(self, key: bytes):
        if self.disk is None:
            return None
        with self._cond:
            entry = self._pending.get(key)
            return None if entry is None else entry.value

    def _promote(self, key: bytes, value, deletes_before: int, *, to_disk: bool) -> None:
        """Copy a lower-tier hit upward unless a delete or a newer put came in meanwhile."""
        if self._deletes != deletes_before or self.memory.contains(key):
            return
        held = self.memory.put(key, value)
        if to_disk and self.disk is not None and not self._held_locally_below(key):
            held = self._enqueue_disk(key, value) or held
        if held and self._listener is not None:
            self._listener.admitted([key])

    def _held_locally_below(self, key: bytes) -> bool:
        return key in self._pending or key in self._inflight or (self.disk is not None and key in self.disk)

    def _demote(self, key: bytes, value) -> None:
        """Hand a value leaving the node to each write-back tier (each only enqueues)."""
        if not self._demote_to:
            return
        self.demotions += 1
        for tier in self._demote_to:
            try:
                tier.demote(key, value)  # type: ignore[attr-defined]
            except Exception:
                log.exception("Shared tier %s refused a demotion", tier.name)

    def _on_memory_evict(self, key: bytes, value) -> None:
        """L1 evicted `key` (called outside its lock). Without a disk tier L1 is the last local
        tier: demote. With one, demote only if the value is neither on disk nor on its way
        there; the check runs under the store lock, against which the writer settles a
        failed write (see _write_loop), so exactly one side sees the value as lost."""
        if self.disk is not None:
            with self._cond:
                if self._held_locally_below(key):
                    return
        self._demote(key, value)
        self._gone([key])

    def _dropped(self, keys: list[bytes]) -> None:
        """L2 evicted `keys` (on_drop): those not in L1 nor pending left the node."""
        self._gone(keys)

    def _gone(self, keys: Iterable[bytes]) -> None:
        """Tell the listener about keys no longer held locally (checked again: a put may have
        brought one back meanwhile)."""
        listener = self._listener
        if listener is None:
            return
        gone = [k for k in keys if not self._held_locally(k)]
        if gone:
            listener.evicted(gone)

    def _count(self, tier: str, hits: int, misses: int, *, export: bool = True) -> None:
        self._hits[tier] += hits
        self._misses[tier] += misses
        if export and hits:
            metrics.TIER_HITS.labels(tier).inc(hits)
        if export and misses:
            metrics.TIER_MISSES.labels(tier).inc(misses)

    def _warn_dropped(self, dropped: int) -> None:
        """One warning per DROP_WARNING_INTERVAL_S, with the count, not one per put under overload."""
        with self._cond:
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

    def _enqueue_disk(self, key: bytes, value) -> bool:
        """Queue a background disk write; the queue is bounded in bytes, oldest dropped first."""
        if self.disk is None:
            return False
        size = nbytes(value)
        dropped = 0
        dropped_keys: list[bytes] = []
        lost: list[tuple[bytes, object]] = []  # dropped and no longer in L1: demote (write-back)
        with self._cond:
            old = self._pending.pop(key, None)
            if old is not None:
                self._pending_bytes -= old.size
            while self._pending and self._pending_bytes + size > self.disk_queue_bytes:
                old_key, oldest = self._pending.popitem(last=False)
                self._pending_bytes -= oldest.size
                dropped += 1
                dropped_keys.append(old_key)
                if self._demote_to and not self.memory.contains(old_key):
                    lost.append((old_key, oldest.value))
            self._pending[key] = _Pending(next(self._seq), value, size)
            self._pending_bytes += size
            self.dropped_writes += dropped
            self._m_queue.set(len(self._pending))
            self._cond.notify_all()
        if dropped:
            self._m_dropped.inc(dropped)
            self._warn_dropped(dropped)
        for old_key, old_value in lost:
            self._demote(old_key, old_value)
        if dropped and self._listener is not None:
            self._gone(dropped_keys)
        return True

    def _write_loop(self) -> None:
        """The one disk writer: FIFO over pending writes, so the newest value lands last."""
        assert self.disk is not None
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait(self.disk_flush_interval)
                if not self._pending:
                    return
                key, entry = self._pending.popitem(last=False)
                self._pending_bytes -= entry.size
                self._inflight[key] = entry.seq
                self._writer_busy = True
                self._m_queue.set(len(self._pending))
            written = False
            try:
                written = self.disk.put(
                    key, entry.value, still_wanted=lambda k=key, s=entry.seq: self._inflight.get(k) == s
                )
            except Exception:
                log.exception("Disk write of %s failed", key.hex())
            finally:
                with self._cond:
                    current = self._inflight.get(key) == entry.seq  # False: a delete revoked it
                    if current:
                        del self._inflight[key]
                    # dropped by the disk, no newer write pending, gone from L1: the eviction
                    # saw it in flight and left it to us (see _on_memory_evict)
                    lost = (
                        bool(self._demote_to)
                        and current
                        and not written
                        and key not in self._pending
                        and not self.memory.contains(key)
                    )
                if lost:
                    self._demote(key, entry.value)
                if current and not written:
                    self._gone([key])
                with self._cond:
                    self._writer_busy = False
                    self._cond.notify_all()
