"""The node's tiered store: L1 memory, L2 disk, then the shared tiers (Redis/Valkey, S3).

The one object the gRPC and data servers call. A put is acknowledged once it is in L1; the disk
write happens on one background writer thread (disk_writes.py; on disk within about a second),
and each shared tier gets the value through its own background queue. A get walks L1, the pending
disk writes, L2 (promoting hits into L1), then the shared tiers in order with one batched call for
all keys still missing (promoting hits into L1 and, in the background, into L2).

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

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import NoRoom
from kvpool.cachenode.core.leases import LeaseTable
from kvpool.cachenode.core.validation import check_key
from kvpool.cachenode.server.tiers.arena_memory import ArenaBuffer, ArenaMemoryTier
from kvpool.cachenode.server.tiers.disk import DiskTier
from kvpool.cachenode.server.tiers.disk_writes import DEFAULT_DISK_QUEUE_BYTES, DiskWriteBehind
from kvpool.cachenode.server.tiers.memory import readonly_view
from kvpool.cachenode.server.tiers.shared import SharedTier, wants_demotions
from kvpool.cachenode.server.tiers.store_stats import local_tier_stats, shared_tier_stats

log = logging.getLogger(__name__)

MEMORY = "memory"
DISK = "disk"


class HoldingsListener(Protocol):
    """Told what a store starts and stops holding (lookup.Publisher is one); must not block."""

    def admitted(self, keys: Iterable[bytes]) -> None: ...
    def evicted(self, keys: Iterable[bytes]) -> None: ...


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
        self._disk_writes: DiskWriteBehind | None = None
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
            self._disk_writes = DiskWriteBehind(
                self.disk,
                queue_bytes=disk_queue_bytes,
                in_memory=self._in_memory,
                lost=self._demote,
                gone=self._gone,
                idle_wait=disk_flush_interval,
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
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._deletes = 0  # bumped by every delete; a get that overlaps one does not promote
        self._closed = False
        self.demotions = 0  # values handed to write-back tiers (evicted from the last local tier)
        names = [MEMORY, DISK, *(t.name for t in self.shared)]
        self._hits = dict.fromkeys(names, 0)
        self._misses = dict.fromkeys(names, 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> TieredStore:
        """Rebuild the disk index (may take seconds), start the writer, then report ready."""
        if self._ready.is_set():
            return self
        if self.disk is not None and self._disk_writes is not None:
            self.disk.rebuild_index()
            self._disk_writes.start()
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
        if self._disk_writes is not None:
            ok = self._disk_writes.flush(timeout)
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
        if self._disk_writes is not None:
            self._disk_writes.close()
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
        queued = self._disk_writes is not None and self._disk_writes.submit(key, value)
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
        """Put each pair; returns how many were taken by some tier. A request's received values
        come through ``memory.drain``: see there why."""
        pairs = items.items() if isinstance(items, Mapping) else items
        return sum(self.put(key, value) for key, value in pairs)

    def delete(self, keys: Iterable[bytes]) -> int:
        """Remove keys from every tier, pending disk writes included; returns how many were held."""
        keys = [check_key(k) for k in keys]
        with self._lock:
            self._deletes += 1
        held = set() if self._disk_writes is None else self._disk_writes.discard(keys)
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
        pending = (
            []
            if self._disk_writes is None
            else [k for k in self._disk_writes.pending_keys() if k not in seen]
        )
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
        if size is None and self._disk_writes is not None:
            size = self._disk_writes.size_of(key)
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

    def stats(self) -> dict:
        def counts(name: str) -> tuple[int, int]:
            return self._hits[name], self._misses[name]

        tiers = {
            MEMORY: local_tier_stats(
                self.memory, *counts(MEMORY), degraded=False, arena_used=self.memory.arena_used
            )
        }
        if self.disk is not None:
            tiers[DISK] = local_tier_stats(
                self.disk, *counts(DISK), degraded=self.disk.degraded, corrupt=self.disk.corrupt
            )
        for tier in self.shared:
            tiers[tier.name] = shared_tier_stats(tier, *counts(tier.name), write_back=tier in self._demote_to)
        pending, pending_bytes, dropped = (
            (0, 0, 0) if self._disk_writes is None else self._disk_writes.stats()
        )
        self._publish_pins()
        return {
            "ready": self.ready,
            "pinned_bytes": self._pinned_published,
            "leases": len(self.leases),
            "leases_expired": self.leases.expired,
            "tiers": tiers,
            "pending_writes": pending,
            "pending_write_bytes": pending_bytes,
            "dropped_writes": dropped,
            "demotions": self.demotions,
        }

    # -- internals -----------------------------------------------------------------------------

    def _held_locally(self, key: bytes) -> bool:
        if self.memory.contains(key) or (self._disk_writes is not None and key in self._disk_writes):
            return True
        return self.disk is not None and self.disk.contains(key)

    def _in_memory(self, key: bytes) -> bool:
        return self.memory.contains(key)

    def _pending_value(self, key: bytes):
        return None if self._disk_writes is None else self._disk_writes.value_of(key)

    def _promote(self, key: bytes, value, deletes_before: int, *, to_disk: bool) -> None:
        """Copy a lower-tier hit upward unless a delete or a newer put came in meanwhile."""
        if self._deletes != deletes_before or self.memory.contains(key):
            return
        held = self.memory.put(key, value)
        if to_disk and self._disk_writes is not None and not self._disk_writes.keeps(key):
            held = self._disk_writes.submit(key, value) or held
        if held and self._listener is not None:
            self._listener.admitted([key])

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
        there (DiskWriteBehind.keeps: ordered against the writer settling a failed write, so
        exactly one side sees the value as lost)."""
        if self._disk_writes is not None and self._disk_writes.keeps(key):
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
