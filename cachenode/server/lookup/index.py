"""The lookup index: chunk key fingerprints → holders, fed by holders' events, read lock-free.

Writers (publish, resync, heartbeat, expire) take one lock; lookups take none: they read the
fingerprint table's current arrays and an immutable snapshot of the holders (replaced whenever a
holder joins or leaves), so a lookup never waits for a writer, not even for a resync of a million
keys. Pure logic: the caller passes the clock, logs and counts what the results say.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from kvpool.cachenode.core.errors import HolderLimit
from kvpool.cachenode.core.holders import BitAllocator, Holder, HolderInfo, Status, Verdict
from kvpool.cachenode.core.located import HolderMatch, Located, Score
from kvpool.cachenode.core.settings.defaults import DEFAULT_MAX_HOLDERS
from kvpool.cachenode.server.lookup.table import FingerprintTable


@dataclass(frozen=True)
class Expired:
    info: HolderInfo
    entries: int
    silent_s: float


FEW_HOLDERS = 4  # up to this many holders in a prefix, per-holder numpy calls beat a bit matrix


def _shares(held: np.ndarray) -> list[tuple[int, int, bytes]]:
    """(holder bit, leading run, bitmap over the prefix) of every holder with a bit in `held`."""
    union = np.bitwise_or.reduce(held, axis=0)
    bits = []
    for w, word in enumerate(union.tolist()):
        while word:
            low = word & -word
            bits.append(64 * w + low.bit_length() - 1)
            word ^= low
    if len(bits) <= FEW_HOLDERS:
        out = []
        for bit in bits:
            has = (held[:, bit // 64] >> np.uint64(bit % 64)) & np.uint64(1) != 0
            run = int(has.argmin()) if not has.all() else len(has)
            out.append((bit, run, np.packbits(has, bitorder="little").tobytes()))
        return out
    matrix = np.unpackbits(held.view(np.uint8), axis=1, bitorder="little")  # (prefix, 64 W)
    runs = np.unpackbits(np.bitwise_and.accumulate(held, axis=0).view(np.uint8), axis=1, bitorder="little")
    runs = runs.sum(axis=0)
    maps = np.packbits(matrix[:, bits].T, axis=1, bitorder="little")
    return [(bit, int(runs[bit]), maps[i].tobytes()) for i, bit in enumerate(bits)]


class LookupIndex:
    def __init__(
        self,
        lease_s: float,
        rebuild_window_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_holders: int = DEFAULT_MAX_HOLDERS,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("the holder lease must be positive")
        self.lease_s = lease_s
        self.max_holders = max_holders
        self.rebuild_window_s = rebuild_window_s
        self._clock = clock
        self.started = clock()
        self._table = FingerprintTable()
        self._holders: dict[str, Holder] = {}
        self._bits = BitAllocator()
        self._by_bit: MappingProxyType[int, HolderInfo] = MappingProxyType({})
        self._lock = threading.Lock()  # writers only
        self._last_sweep = self.started
        self._authoritative = rebuild_window_s <= 0

    # -- readers (no lock) ------------------------------------------------------------------
    @property
    def authoritative(self) -> bool:
        """False until the rebuild window after start has passed: holders are still resyncing."""
        if not self._authoritative and self._clock() - self.started >= self.rebuild_window_s:
            self._authoritative = True
        return self._authoritative

    def locate(self, fps: np.ndarray) -> Located:
        """The longest prefix of the keys that some holder holds, and who holds what of it."""
        by_bit = self._by_bit  # one consistent snapshot of the holders for this lookup
        authoritative = self.authoritative
        masks = self._table.masks(fps)
        present = masks.any(axis=1) if masks.shape[1] > 1 else masks[:, 0] != 0
        prefix = len(present) if present.all() else int(present.argmin())
        if prefix == 0:
            return Located(0, [], authoritative)
        held = masks[:prefix]
        holders = []
        for bit, run, bitmap in _shares(held):
            info = by_bit.get(bit)
            if info is not None:  # None: dropped after this lookup read its masks
                holders.append(HolderMatch(info, run, bitmap))
        return Located(prefix, holders, authoritative)

    def holders(self) -> list[Holder]:
        return list(self._holders.values())

    @property
    def keys(self) -> int:
        return self._table.live

    @property
    def entries(self) -> int:
        return sum(h.entries for h in self.holders())

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def table_stats(self) -> dict:
        t = self._table
        return {"capacity": t.capacity, "tombstones": t.tombstones, "mask_words": t.words}

    # -- writers ----------------------------------------------------------------------------
    def resync(
        self, info: HolderInfo, incarnation: int, seq: int, fps: np.ndarray, pending: int = 0
    ) -> Verdict:
        """Replace everything `info.holder_id` holds with the snapshot `fps`, as of `seq`.

        Keys in both the old and the new state stay visible throughout (the new ones are added
        before the ones that are gone are cleared).
        """
        with self._lock:
            now = self._clock()
            holder = self._holders.get(info.holder_id)
            dropped, drop_reason = 0, ""
            if holder is not None and holder.incarnation != incarnation:
                dropped, drop_reason = self._clear(holder), "incarnation"
            elif holder is not None and holder.synced and seq <= holder.last_seq:
                return Verdict(
                    Status.DUPLICATE,
                    f"stale resync {seq}: applied up to {holder.last_seq}",
                    "stale_resync",
                    holder.last_seq,
                )
            if holder is None:
                if len(self._holders) >= self.max_holders:
                    raise HolderLimit(f"the index already has its limit of {self.max_holders} holders")
                holder = Holder(info, self._bits.allocate(now), incarnation, seq, 0.0, time.time(), now)
                self._holders[info.holder_id] = holder
            holder.info, holder.incarnation, holder.last_seq = info, incarnation, seq
            holder.synced = True
            holder.resyncs += 1
            self._renew(holder, now, pending)
            self._publish_holders()
            _, slots = self._table.add(fps, holder.bit)
            lost, holder.entries = self._table.retain(holder.bit, slots)
            if lost and not drop_reason:
                dropped, drop_reason = lost, "resync"
            return Verdict(Status.OK, "", "", seq, dropped, drop_reason)

    def publish(
        self,
        holder_id: str,
        incarnation: int,
        seq: int,
        admitted: np.ndarray,
        evicted: np.ndarray,
        age_s: float = 0.0,
        pending: int = 0,
    ) -> Verdict:
        """Apply one batch of events if it is the holder's next; otherwise say what to do."""
        with self._lock:
            verdict, holder = self._check(holder_id, incarnation, seq, exact_next=True)
            if holder is not None:
                self._renew(holder, self._clock(), pending)
            if verdict.status is not Status.OK:
                return verdict
            assert holder is not None
            if len(evicted):
                holder.entries -= self._table.remove(evicted, holder.bit)
            if len(admitted):
                gained, _ = self._table.add(admitted, holder.bit)
                holder.entries += gained
            holder.last_seq = seq
            holder.lag_s = age_s
            verdict.last_seq = seq
            return verdict

    def heartbeat(self, holder_id: str, incarnation: int, seq: int, pending: int = 0) -> Verdict:
        """Renew the lease; ask for a resync when the holder is ahead of what was applied."""
        with self._lock:
            verdict, holder = self._check(holder_id, incarnation, seq, exact_next=False)
            if holder is not None:
                self._renew(holder, self._clock(), pending)
            return verdict

    def expire(self) -> list[Expired]:
        """Drop the holders whose lease ran out. After a stall of this process itself (no sweep
        for half a lease), leases are extended by the stall instead: silence that the service
        could not have heard is not the holders' fault."""
        with self._lock:
            now = self._clock()
            stall = now - self._last_sweep
            self._last_sweep = now
            if stall > self.lease_s / 2:
                for holder in self._holders.values():
                    holder.lease_expiry += stall
                return []
            expired = []
            for holder in [h for h in self._holders.values() if h.lease_expiry < now]:
                expired.append(Expired(holder.info, self._clear(holder), now - holder.last_seen))
                self._remove(holder, now)
            if expired:
                self._publish_holders()
            return expired

    # -- internals (writer lock held) ----------------------------------------------------------
    def _check(
        self, holder_id: str, incarnation: int, seq: int, exact_next: bool
    ) -> tuple[Verdict, Holder | None]:
        holder = self._holders.get(holder_id)
        if holder is None:
            reason = "unknown holder (new, expired, or the lookup service restarted)"
            return Verdict(Status.RESYNC, reason, "unknown_holder"), None
        if holder.incarnation != incarnation:
            dropped = self._clear(holder)
            holder.incarnation, holder.last_seq, holder.synced = incarnation, 0, False
            reason = "new incarnation: the holder restarted"
            return Verdict(Status.RESYNC, reason, "new_incarnation", 0, dropped, "incarnation"), holder
        if not holder.synced:
            reason = "waiting for this incarnation's first snapshot"
            return Verdict(Status.RESYNC, reason, "awaiting_snapshot"), holder
        last = holder.last_seq
        if exact_next and seq <= last:
            return Verdict(Status.DUPLICATE, f"sequence {seq} already applied", "duplicate", last), holder
        if (exact_next and seq > last + 1) or (not exact_next and seq != last):
            reason = f"sequence gap: applied up to {last}, got {seq}"
            return Verdict(Status.RESYNC, reason, "sequence_gap", last), holder
        return Verdict(Status.OK, "", "", last), holder

    def _renew(self, holder: Holder, now: float, pending: int) -> None:
        holder.lease_expiry = now + self.lease_s
        holder.last_seen = now
        holder.pending = pending

    def _clear(self, holder: Holder) -> int:
        """Remove every entry of the holder; how many there were."""
        removed = self._table.remove_holder(holder.bit)
        holder.entries = 0
        return removed

    def _remove(self, holder: Holder, now: float) -> None:
        del self._holders[holder.info.holder_id]
        self._bits.release(holder.bit, now)

    def _publish_holders(self) -> None:
        self._by_bit = MappingProxyType({h.bit: h.info for h in self._holders.values()})


def scores(located: Located, tokens_per_key: int, kind: str = "") -> list[Score]:
    """Per-holder prefix scores for routers: a holder scores the leading keys it holds without a
    gap, times the tokens per key; best first, holders that match nothing left out."""
    out = [
        Score(m.info, m.run, m.run * tokens_per_key)
        for m in located.holders
        if m.run and (not kind or m.info.kind == kind)
    ]
    out.sort(key=lambda s: (-s.matched_keys, s.info.holder_id))
    return out
