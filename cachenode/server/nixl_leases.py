"""Leases on L1 arena ranges for one-sided transfers (NIXL): what a peer reads or writes by
address stays where it is until the peer is done, and no longer than a TTL.

A get lease holds the stored views of the keys it hands out (``ArenaBuffer``s): while it
lives, the ranges cannot be freed or reused, and the keys are pinned in the store's
``LeaseTable`` so L1 does not evict them. It ends when the peer's transfer notification (or a
Release call) arrives, or when its TTL passes.

A put lease holds freshly allocated ranges that nothing else can see. The peer WRITEs into
them, then commits with a checksum per value; only a commit whose checksums match the bytes in
the arena makes the values visible (``store.put`` adopts the ranges without a copy). A put
lease that expires is not freed at once: its ranges wait one more TTL (``grace_s``) before
they return to the allocator, so a writer that overran its lease cannot land its bytes in a
range that already holds another value. Clients stop using a lease well before its TTL
(nixl_client.py), so the grace is a second line of defence, not the first.

Lease ids come from the ``LeaseTable``; each lease also carries a random token that every
release and commit must present, so a stray or forged notification cannot end someone else's
lease.

The same leases serve an agent's shared-memory arena (``transport="arena"``): the connector in
the pod reads and writes the arena file at the leased offsets instead of a NIXL peer.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import CorruptData, InvalidRequest, LeaseGone, NoRoom
from kvpool.cachenode.core.record import checksum
from kvpool.cachenode.core.validation import check_key

if TYPE_CHECKING:
    from kvpool.cachenode.server.tiers.arena_memory import ArenaBuffer
    from kvpool.cachenode.server.tiers.store import TieredStore

log = logging.getLogger(__name__)

GET = "get"
PUT = "put"
_COUNTERS = {
    "nixl": (metrics.NIXL_LEASES, metrics.NIXL_LEASES_EXPIRED),
    "arena": (metrics.ARENA_LEASES, metrics.ARENA_LEASES_EXPIRED),
}


@dataclass
class TransferLease:
    lease_id: int
    token: int
    kind: str
    expiry: float
    keys: list[bytes]
    buffers: list[ArenaBuffer | None] = field(repr=False)


class TransferLeases:
    """Thread-safe. ``clock`` is injectable for tests; it must be the LeaseTable's clock."""

    def __init__(
        self,
        store: TieredStore,
        ttl_s: float,
        *,
        grace_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        transport: str = "nixl",
        on_commit: Callable[[list[bytes], list], None] | None = None,
    ) -> None:
        """`transport`: who reads and writes the leased ranges ("nixl" peers, or "arena": the
        connector in an agent's pod), for metrics and logs. `on_commit(keys, values)`: told what
        each commit stored (an agent writes it through to the cache nodes)."""
        self.transport = transport
        self._on_commit = on_commit
        self._opened, self._expired = _COUNTERS[transport]
        self._store = store
        self.ttl_s = ttl_s
        self.grace_s = ttl_s if grace_s is None else grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[int, TransferLease] = {}
        self._quarantine: list[tuple[float, list]] = []  # (free after, buffers) of expired put leases
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for lease in self._live.values() if lease.kind == kind)

    # -- get -----------------------------------------------------------------------------------

    def open_get(self, keys: Sequence[bytes]) -> TransferLease:
        """Pin and hold the L1 ranges of ``keys`` (loading misses from lower tiers into L1);
        ``buffers[i]`` is None for a key the pool does not hold."""
        keys = [check_key(k) for k in keys]
        buffers = self._store.hold_many(keys)  # raises NoRoom
        if all(b is None for b in buffers):
            return TransferLease(0, 0, GET, 0.0, keys, buffers)  # nothing to read: no lease
        return self._open(GET, keys, buffers)

    # -- put -----------------------------------------------------------------------------------

    def open_put(self, entries: Sequence[tuple[bytes, int]]) -> TransferLease:
        """Allocate a range per (key, size) for the peer to write; all or nothing."""
        keys = [check_key(k) for k, _ in entries]
        if len(set(keys)) != len(keys):
            raise InvalidRequest("a put reservation names the same key twice")
        buffers: list = []
        for _, size in entries:
            if size <= 0:
                raise InvalidRequest(f"a {self.transport} put needs a positive size, got {size}")
            buf = self._store.allocate(size)
            if buf is None:
                raise NoRoom(f"L1 has no room for {len(entries)} values now")  # buffers drop: freed
            buffers.append(buf)
        return self._open(PUT, keys, buffers)

    def commit(self, lease_id: int, token: int, checksums: Sequence[int]) -> int:
        """Verify every written value against its checksum and store them all, or none."""
        lease = self._take(lease_id, token, PUT)
        try:
            if len(checksums) != len(lease.keys):
                raise InvalidRequest(
                    f"commit carries {len(checksums)} checksums for {len(lease.keys)} values"
                )
            for key, buf, expected in zip(lease.keys, lease.buffers, checksums, strict=True):
                if checksum(key, buf) != expected:
                    metrics.ERRORS.labels(f"{self.transport}_checksum").inc()
                    raise CorruptData(f"value of key {key.hex()} does not match its checksum; nothing stored")
            stored = self._store.put_many(list(zip(lease.keys, lease.buffers, strict=True)))
            if self._on_commit is not None:
                self._on_commit(list(lease.keys), list(lease.buffers))
            return stored
        finally:
            self._end(lease)

    # -- both ----------------------------------------------------------------------------------

    def release(self, lease_id: int, token: int) -> bool:
        """End a lease early (the peer is done or gave up); False if it is already gone."""
        try:
            lease = self._take(lease_id, token, None)
        except LeaseGone:
            return False
        self._end(lease)
        return True

    def sweep(self) -> int:
        """End expired leases (put leases' ranges go to quarantine) and free what has waited
        out its quarantine; returns how many leases ended."""
        now = self._clock()
        with self._lock:
            doomed = [lease for lease in self._live.values() if lease.expiry <= now]
            for lease in doomed:
                del self._live[lease.lease_id]
                if lease.kind == PUT:
                    self._quarantine.append((lease.expiry + self.grace_s, lease.buffers))
            freed = [q for q in self._quarantine if q[0] <= now]
            self._quarantine = [q for q in self._quarantine if q[0] > now]
            self.expired += len(doomed)
        for lease in doomed:
            log.info(
                "%s %s lease %d expired holding %d values (peer gone or too slow)",
                self.transport,
                lease.kind,
                lease.lease_id,
                len(lease.keys),
            )
            self._store.release(lease.lease_id)
            self._expired.labels(lease.kind).inc()
        del doomed, freed  # the last references: the ranges return to the arena
        return self.expired

    def clear(self) -> None:
        with self._lock:
            leases = list(self._live.values())
            self._live.clear()
            self._quarantine.clear()
        for lease in leases:
            self._store.release(lease.lease_id)

    # -- internals -----------------------------------------------------------------------------

    def _open(self, kind: str, keys: list[bytes], buffers: list) -> TransferLease:
        pins = [(k, b.nbytes) for k, b in zip(keys, buffers, strict=True) if b is not None]
        lease_id = self._store.open_lease(pins, self.ttl_s)
        lease = TransferLease(lease_id, secrets.randbits(63), kind, self._clock() + self.ttl_s, keys, buffers)
        with self._lock:
            self._live[lease_id] = lease
        self._opened.labels(kind).inc()
        return lease

    def _take(self, lease_id: int, token: int, kind: str | None) -> TransferLease:
        with self._lock:
            lease = self._live.get(lease_id)
            if lease is None or lease.token != token or (kind is not None and lease.kind != kind):
                raise LeaseGone(f"lease {lease_id} is unknown, expired or not yours")
            if lease.expiry <= self._clock():
                raise LeaseGone(f"lease {lease_id} expired")  # sweep() ends it
            del self._live[lease_id]
            return lease

    def _end(self, lease: TransferLease) -> None:
        self._store.release(lease.lease_id)
        lease.buffers = []
