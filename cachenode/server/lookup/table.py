"""An open-addressing table of key fingerprints → holder bitmasks, in one numpy array.

Layout: ``records[slot] = [fingerprint, mask word 0 .. W-1]`` (bit i of the mask: holder index i
holds the key); 8 slots per bucket and a key's probe reads its home bucket and the next one (16
records, contiguous) in one gather, which also brings the masks: one random memory access per key.
A bucket's used slots are a prefix of it (slots fill left to right and a removed key leaves a
tombstone), so "bucket not full" proves that no key ever overflowed past it; an overflowing key
goes to the next bucket (spill buckets at the end, no wrap-around). A slot costs (1 + W) * 8
bytes; at 1M keys with W = 1 (64 holders) that is 16 bytes at a load factor between 0.45 and 0.75:
21 to 36 bytes per key.

Concurrency: one writer at a time (the caller's lock); readers take no lock. A reader takes the
current ``_Arrays`` once and probes them; growth and compaction build new arrays and swap that
one reference. In live arrays a slot is published by writing its fingerprint last and retired by
clearing its mask before its fingerprint, so a reader sees a key with its holders, a key with no
holders (a miss), or no key - never a holder for a key that holder did not publish.

Writers work in slices of at most SLICE keys (a snapshot of millions of keys, a growth, a holder's
removal): numpy holds the GIL through a fancy-index gather or a sort, so one call over millions
of keys would stop every reader thread of the process for as long. Between slices the readers run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpool.cachenode.core.fingerprint import LIVE_BIT

SLOTS = 8
SPILL = 16  # buckets after the last home bucket that only take overflow
MAX_LOAD = 0.75  # used slots (live + tombstones) over capacity before growing or compacting
GROWTH = 1.67  # capacity after a rebuild: live keys x GROWTH / MAX_LOAD (load 0.45)
MIN_BUCKETS = 1024
SLICE = 32768  # most keys one writer step handles in one numpy call (readers run between steps)
EMPTY = np.uint64(0)
TOMBSTONE = np.uint64(1)  # no LIVE_BIT: occupied, matches no fingerprint
_LOW32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)


@dataclass(frozen=True)
class _Arrays:
    records: np.ndarray  # ((buckets + SPILL) * SLOTS, 1 + words) uint64
    pairs: np.ndarray  # read-only view (buckets + SPILL - 1, 2 * SLOTS, 1 + words): buckets b, b + 1
    buckets: int  # home buckets
    spread: np.uint64  # np.uint64(buckets), made once for bucket_of

    @classmethod
    def empty(cls, buckets: int, words: int) -> _Arrays:
        rows = buckets + SPILL
        records = np.zeros((rows * SLOTS, 1 + words), np.uint64)
        record = records.strides[0]
        pairs = np.lib.stride_tricks.as_strided(
            records,
            shape=(rows - 1, 2 * SLOTS, 1 + words),
            strides=(SLOTS * record, record, 8),
            writeable=False,
        )
        return cls(records, pairs, buckets, np.uint64(buckets))

    @property
    def rows(self) -> int:
        return self.buckets + SPILL


class _SpillFull(Exception):
    """Overflow ran past the spill buckets; the table must grow."""


def bucket_of(fps: np.ndarray, buckets: np.uint64) -> np.ndarray:
    """Map fingerprints onto 0..buckets-1 (multiply-shift of the low 32 bits: any count works)."""
    return (((fps & _LOW32) * buckets) >> _U32).astype(np.intp)


class FingerprintTable:
    """Writers: one at a time (the caller's lock). Readers: `masks`, lock-free."""

    def __init__(self, buckets: int = MIN_BUCKETS, words: int = 1) -> None:
        self._a = _Arrays.empty(max(buckets, MIN_BUCKETS), words)
        self.live = 0
        self.tombstones = 0
        self.rebuilds = 0  # slots move at a rebuild: slots from before it are void

    @property
    def words(self) -> int:
        return self._a.records.shape[1] - 1

    @property
    def nbytes(self) -> int:
        return self._a.records.nbytes

    @property
    def capacity(self) -> int:
        return self._a.buckets * SLOTS

    # -- reading (lock-free) ----------------------------------------------------------------
    def masks(self, fps: np.ndarray) -> np.ndarray:
        """(n, W) holder masks of the fingerprints (zeros where absent)."""
        return _find(self._a, fps, with_slots=False)[1]

    # -- writing (caller holds the writer lock) --------------------------------------------
    def add(self, fps: np.ndarray, bit: int) -> tuple[int, np.ndarray]:
        """Mark holder `bit` on every fingerprint, inserting absent ones.

        Returns how many keys gained the bit and the slot of every fingerprint.
        """
        if len(fps) <= SLICE:
            return self._add(fps, bit)
        rebuilds, gained, parts = self.rebuilds, 0, []
        for piece in _slices(fps):
            more, slots = self._add(piece, bit)
            gained += more
            parts.append(slots)
        if self.rebuilds != rebuilds:  # a growth moved the keys of earlier slices
            parts = [_find(self._a, piece)[0] for piece in _slices(fps)]
        return gained, np.concatenate(parts)

    def _add(self, fps: np.ndarray, bit: int) -> tuple[int, np.ndarray]:
        if not len(fps):
            return 0, np.empty(0, np.intp)
        word, value = _bit(bit)
        if word >= self.words:
            self._rebuild(self._a.buckets, word + 1)
        distinct = _distinct(fps)
        slots, _ = _find(self._a, fps)
        absent = slots < 0
        if absent.any():
            new, inverse = (fps[absent], None) if distinct else np.unique(fps[absent], return_inverse=True)
            moved = self._reserve(len(new))
            while True:
                if moved:
                    slots, _ = _find(self._a, fps)  # the rebuild moved every present key
                try:
                    placed = _place(self._a, new)
                    slots[absent] = placed if inverse is None else placed[inverse.ravel()]
                    break
                except _SpillFull:
                    self._rebuild(_grown(self._a.buckets), self.words)
                    moved = True
            self.live += len(new)
        column = self._a.records[:, 1 + word]
        gained = slots[(column[slots] & value) == EMPTY]
        if not distinct:
            gained = np.unique(gained)
        column[gained] |= value
        return int(gained.size), slots

    def remove(self, fps: np.ndarray, bit: int) -> int:
        """Clear holder `bit` on the fingerprints; keys left with no holder become tombstones."""
        if not len(fps) or bit >= 64 * self.words:
            return 0
        word, value = _bit(bit)
        removed = 0
        for piece in _slices(fps):
            slots, masks = _find(self._a, piece)
            slots = np.unique(slots[(masks[:, word] & value) != EMPTY])
            removed += self._clear(slots, word, value)
        return removed

    def remove_holder(self, bit: int) -> int:
        """Clear holder `bit` everywhere; how many keys lost it."""
        return self.retain(bit, None)[0]

    def retain(self, bit: int, keep_slots: np.ndarray | None) -> tuple[int, int]:
        """Clear holder `bit` everywhere except in `keep_slots` (from `add`, repeats allowed);
        returns (keys that lost it, keys that keep it)."""
        if bit >= 64 * self.words:
            return 0, 0
        word, value = _bit(bit)
        holding = (self._a.records[:, 1 + word] & value) != EMPTY
        before = int(np.count_nonzero(holding))
        if keep_slots is not None:
            for piece in _slices(keep_slots):
                holding[piece] = False
        lost = np.flatnonzero(holding)
        return self._clear(lost, word, value), before - int(lost.size)

    def _clear(self, slots: np.ndarray, word: int, value: np.uint64) -> int:
        """Clear one bit in the slots; a slot left with no holder becomes a tombstone."""
        records = self._a.records
        for piece in _slices(slots):
            records[piece, 1 + word] &= ~value
            empty = piece[~records[piece, 1:].any(axis=1)]
            if empty.size:
                records[empty, 0] = TOMBSTONE
                self.live -= int(empty.size)
                self.tombstones += int(empty.size)
        return int(slots.size)

    def _reserve(self, extra: int) -> bool:
        """Make room for `extra` new keys; True when that rebuilt the table (slots moved)."""
        if self.live + self.tombstones + extra <= MAX_LOAD * self.capacity:
            return False
        wanted = int((self.live + extra) * GROWTH / (MAX_LOAD * SLOTS)) + 1
        self._rebuild(max(self._a.buckets, wanted), self.words)
        return True

    def _rebuild(self, buckets: int, words: int) -> None:
        """Re-place the live keys into fresh arrays (dropping tombstones), then swap them in."""
        old = self._a.records
        live = np.flatnonzero((old[:, 0] & LIVE_BIT) != EMPTY)
        while True:
            fresh = _Arrays.empty(buckets, words)
            try:
                for piece in _slices(live):  # the fresh arrays are nobody else's yet
                    slots = _place(fresh, old[piece, 0])
                    fresh.records[slots, 1 : old.shape[1]] = old[piece, 1:]
                break
            except _SpillFull:
                buckets = _grown(buckets)
        self._a = fresh  # readers that already hold the old arrays finish on them
        self.live = int(live.size)
        self.tombstones = 0
        self.rebuilds += 1


def _slices(values: np.ndarray) -> list[np.ndarray]:
    """`values` in pieces of at most SLICE (views, no copies)."""
    return [values[i : i + SLICE] for i in range(0, len(values), SLICE)] if len(values) > SLICE else [values]


def _grown(buckets: int) -> int:
    return int(buckets * GROWTH) + 1


def _bit(bit: int) -> tuple[int, np.uint64]:
    return bit // 64, np.uint64(1 << (bit % 64))


def _distinct(fps: np.ndarray) -> bool:
    """True when no fingerprint repeats (the usual batch): the unique() passes can be skipped."""
    ordered = np.sort(fps)
    return not (ordered[1:] == ordered[:-1]).any()


def _find(a: _Arrays, fps: np.ndarray, with_slots: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
    """The slot of each fingerprint (-1 where absent) and its mask words (zeros where absent).

    One gather reads a key's home bucket and the next one: a key that overflowed once is found in
    the same round, and its mask comes with it. A fingerprint is stored at most once.
    """
    bucket = bucket_of(fps, a.spread)
    rows = a.pairs[bucket]  # (n, 16, 1 + W)
    equal = rows[:, :, 0] == fps[:, None]
    found = equal.view(np.uint64).any(axis=1)  # 16 bools = two words per row
    position = equal.argmax(axis=1)
    masks = rows[np.arange(len(fps)), position, 1:]
    missing = ~found
    masks[missing] = EMPTY
    slots = None  # readers need no slots
    if with_slots:
        slots = bucket * SLOTS + position
        slots[missing] = -1
    # A miss is final once a bucket of the pair has a free slot: nothing overflowed past it.
    more = missing & (rows[:, SLOTS - 1, 0] != EMPTY) & (rows[:, 2 * SLOTS - 1, 0] != EMPTY)
    if more.any():
        _find_further(a, fps, bucket, slots, masks, np.flatnonzero(more))
    return slots, masks


def _find_further(a: _Arrays, fps, bucket, slots, masks, todo) -> None:
    """The rare keys whose home pair was full: walk on pair by pair (results written in place)."""
    last_pair = a.pairs.shape[0] - 1
    pair = bucket[todo] + 2
    while todo.size:
        pair = np.minimum(pair, last_pair)
        rows = a.pairs[pair]
        equal = rows[:, :, 0] == fps[todo, None]
        found = equal.view(np.uint64).any(axis=1)
        if found.any():
            position = equal[found].argmax(axis=1)
            if slots is not None:
                slots[todo[found]] = pair[found] * SLOTS + position
            masks[todo[found]] = rows[np.flatnonzero(found), position, 1:]
        more = ~found & (rows[:, SLOTS - 1, 0] != EMPTY) & (rows[:, 2 * SLOTS - 1, 0] != EMPTY)
        more &= pair < last_pair
        todo, pair = todo[more], pair[more] + 2


def _place(a: _Arrays, fps: np.ndarray) -> np.ndarray:
    """Write absent, distinct fingerprints into free slots; returns their slots.

    Keys that share a bucket take consecutive free slots (their rank within the bucket); the ones
    that do not fit move on to the next bucket and are placed in the next round. Raises _SpillFull
    when a key would run past the spill buckets (keys placed so far have empty masks: a reader
    sees them as misses).
    """
    out = np.empty(len(fps), np.intp)
    todo = np.arange(len(fps))
    bucket = bucket_of(fps, a.spread)
    used_rows = a.records[:, 0].reshape(a.rows, SLOTS)
    while todo.size:
        if int(bucket.max()) >= a.rows:
            raise _SpillFull
        order = np.argsort(bucket, kind="stable")
        todo, bucket = todo[order], bucket[order]
        starts = np.r_[True, bucket[1:] != bucket[:-1]]
        rank = np.arange(bucket.size) - np.maximum.accumulate(np.where(starts, np.arange(bucket.size), 0))
        position = (used_rows[bucket] != EMPTY).sum(axis=1) + rank
        fits = position < SLOTS
        slot = bucket[fits] * SLOTS + position[fits]
        a.records[slot, 0] = fps[todo[fits]]  # the mask is still empty: the key reads as a miss
        out[todo[fits]] = slot
        todo = todo[~fits]
        bucket = bucket[~fits] + 1
    return out
