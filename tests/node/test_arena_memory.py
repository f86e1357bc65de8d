"""The arena-backed L1: LRU under a byte budget, stable addresses, and ranges that stay intact
while anything still reads them."""

from __future__ import annotations

import gc
import os
import threading
import uuid

import numpy as np
import pytest

from kvpool.cachenode.server.tiers.arena_memory import ArenaBuffer, ArenaMemoryTier
from kvpool.cachenode.server.tiers.store import TieredStore


def tier(capacity: int, **kwargs) -> ArenaMemoryTier:
    kwargs.setdefault("high_watermark", 1.0)
    kwargs.setdefault("low_watermark", 1.0)
    return ArenaMemoryTier(capacity, name=f"arena-{uuid.uuid4().hex[:6]}", **kwargs)


def test_values_round_trip_for_many_sizes() -> None:
    t = tier(8 << 20)
    values = {b"k%d" % i: os.urandom(size) for i, size in enumerate([0, 1, 63, 64, 4095, 4097, 1 << 20])}
    for key, value in values.items():
        assert t.put(key, value)
    for key, value in values.items():
        got = t.get(key)
        assert isinstance(got, ArenaBuffer) and bytes(got) == value and not got.flags.writeable
        assert t.address <= t.address_of(got) < t.address + t.arena_bytes
    assert t.usage == sum(len(v) for v in values.values())
    t.arena.extents.check()


def test_lru_eviction_keeps_usage_within_budget() -> None:
    evicted = []
    t = tier(10_000, on_evict=lambda k, v: evicted.append((k, bytes(v))))
    values = {b"v%d" % i: os.urandom(3000) for i in range(5)}
    for key, value in values.items():
        assert t.put(key, value)
        assert t.usage <= t.capacity
    assert [k for k, _ in evicted] == [b"v0", b"v1"]
    assert evicted[0][1] == values[b"v0"]  # the evicted bytes, intact, for write-back tiers
    assert t.lru_order() == [b"v2", b"v3", b"v4"] and t.peak_usage <= t.capacity


def test_pinned_keys_are_never_evicted() -> None:
    pinned = {b"keep"}
    t = tier(10_000, pinned=pinned.__contains__)
    assert t.put(b"keep", b"k" * 4000)
    for i in range(6):
        assert t.put(b"x%d" % i, b"x" * 4000)
    assert bytes(t.get(b"keep")) == b"k" * 4000
    pinned.add(b"x5")
    assert not t.put(b"big", b"b" * 4000)  # everything left is pinned: no room, nothing dropped
    assert t.contains(b"keep") and t.contains(b"x5")


def test_a_range_being_read_is_not_reused_until_its_reader_lets_go() -> None:
    t = tier(3 * 4096)
    value = os.urandom(4096)
    t.put(b"old", value)
    reading = memoryview(t.get(b"old")).toreadonly()  # what a data-channel get sends from
    address = t.address_of(t.get(b"old"))
    assert t.delete(b"old")
    for i in range(6):  # churn: the deleted range must not be handed out while it is read
        t.put(b"new%d" % i, bytes([i]) * 4096)
        assert bytes(reading) == value
    assert t.arena_used == t.usage + 4096
    del reading
    gc.collect()
    assert t.arena_used == t.usage  # freed once the reader let go
    t.put(b"again", b"z" * 4096)
    assert any(t.address_of(t.get(k)) == address for k in t.lru_order())  # and reused


def test_derived_arrays_keep_the_range_alive() -> None:
    t = tier(4096)
    t.put(b"k", b"a" * 1000)
    derived = [np.asarray(t.get(b"k"))[10:20], np.frombuffer(t.get(b"k"), np.uint8)]
    t.delete(b"k")
    gc.collect()
    assert t.arena_used > 0
    assert not t.put(b"other", b"b" * 4096)  # its range is still held: no room for a full page
    del derived
    gc.collect()
    assert t.put(b"other", b"b" * 4096) and t.arena_used == 4096


def test_allocate_then_put_adopts_without_copy() -> None:
    t = tier(1 << 20)
    buf = t.allocate(5000)
    buf[:] = np.frombuffer(b"q" * 5000, np.uint8)
    address = t.address_of(buf)
    assert t.put(b"adopted", buf)
    got = t.get(b"adopted")
    assert got is buf and t.address_of(got) == address and bytes(got) == b"q" * 5000
    assert t.arena_used == 5056  # one range, 64-byte aligned: no second copy


def test_allocate_evicts_least_recent_and_refuses_when_all_pinned() -> None:
    pinned: set[bytes] = set()
    t = tier(8192, pinned=pinned.__contains__)
    t.put(b"a", b"a" * 4096)
    t.put(b"b", b"b" * 4096)
    first = t.allocate(4096)
    assert first is not None and not t.contains(b"a") and t.contains(b"b")
    pinned.add(b"b")
    assert t.allocate(4096) is None
    assert t.allocate(t.capacity + 1) is None
    del first
    assert t.allocate(4096) is not None


def test_concurrent_writers_stay_in_budget_and_correct() -> None:
    t = tier(64 * 4096, high_watermark=0.9, low_watermark=0.7)
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(200):
            key = b"t%d-%d" % (n, i % 20)
            value = bytes([n]) * (4096 * (1 + i % 3))
            t.put(key, value)
            got = t.get(key)
            if got is not None and bytes(got) != bytes([n]) * len(got):  # only writer n writes t<n>-*
                errors.append(f"{key!r} read back bytes another writer wrote")
            if t.usage > t.capacity:
                errors.append(f"usage {t.usage} over {t.capacity}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and t.peak_usage <= t.capacity
    gc.collect()
    assert t.arena_used == sum(
        -(-int(t.size_of(k) or 1) // 64) * 64 for k in t.lru_order()
    )  # nothing leaked: only what the index holds
    t.arena.extents.check()


def test_store_reads_from_lower_tiers_land_in_l1_ranges(tmp_path) -> None:
    with TieredStore(1 << 20, str(tmp_path), 4 << 20, high_watermark=1.0, low_watermark=1.0) as s:
        value = os.urandom(300_000)
        s.put(b"cold", value)
        assert s.flush(5)
        for i in range(4):
            s.put(b"fill%d" % i, os.urandom(300_000))  # pushes "cold" out of L1 (still on disk)
        assert not s.memory.contains(b"cold")
        (held,) = s.hold_many([b"cold"])
        assert isinstance(held, ArenaBuffer) and held.owner is s.memory and bytes(held) == value
        assert s.hold_many([b"never"]) == [None]


def test_store_put_of_an_allocation_is_stored_in_place() -> None:
    with TieredStore(1 << 20) as s:
        buf = s.allocate(4096)
        buf[:] = 7
        assert s.put(b"in-place", buf)
        view = s.get(b"in-place")
        assert view.obj is buf and bytes(view) == b"\x07" * 4096
        stats = s.stats()
        assert stats["tiers"]["memory"]["arena_used"] == 4096 and stats["pinned_bytes"] == 0


@pytest.mark.parametrize("bad", [-1, 10 << 20])
def test_allocate_rejects_impossible_sizes(bad: int) -> None:
    assert tier(1 << 20).allocate(bad) is None
