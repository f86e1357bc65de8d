"""L1 memory tier (the arena-backed LRU): LRU order, watermarks, ownership, and the budget under
many threads."""

from __future__ import annotations

import random
import threading
import uuid

import numpy as np
import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode.server.tiers.arena_memory import ArenaMemoryTier as MemoryTier


def _name() -> str:
    return f"mem-{uuid.uuid4().hex[:8]}"  # own metric label per test


def _metric(metric: str, tier: str) -> float:
    return REGISTRY.get_sample_value(metric, {"tier": tier}) or 0.0


def test_lru_order_get_touches_peek_and_contains_do_not():
    tier = MemoryTier(300, high_watermark=1.0, low_watermark=1.0, name=_name())
    for key in (b"a", b"b", b"c"):
        assert tier.put(key, bytes(100))
    assert tier.get(b"a") is not None  # a becomes most recent; b is now the oldest
    assert tier.peek(b"b") is not None and tier.contains(b"b")  # no touch
    assert tier.put(b"d", bytes(100))
    assert tier.lru_order() == [b"c", b"a", b"d"]
    assert not tier.contains(b"b")


def test_watermarks_evict_down_to_low_once_high_is_passed():
    name = _name()
    tier = MemoryTier(1000, high_watermark=0.9, low_watermark=0.5, name=name)
    for i in range(9):
        assert tier.put(b"k%d" % i, bytes(100))
    assert tier.usage == 900 and len(tier) == 9  # at, not past, the high watermark
    assert tier.put(b"k9", bytes(100))
    assert tier.usage == 500
    assert tier.lru_order() == [b"k5", b"k6", b"k7", b"k8", b"k9"]
    assert tier.evictions == 5
    assert _metric("kvpool_tier_evictions_total", name) == 5
    assert _metric("kvpool_tier_usage_bytes", name) == 500
    assert _metric("kvpool_tier_entries", name) == 5
    assert _metric("kvpool_tier_capacity_bytes", name) == 1000


def test_value_larger_than_capacity_is_refused():
    tier = MemoryTier(100, name=_name())
    assert tier.put(b"small", bytes(10))
    assert not tier.put(b"big", bytes(101))
    assert tier.usage == 10 and not tier.contains(b"big")


def test_overwrite_replaces_and_adjusts_usage():
    tier = MemoryTier(1000, name=_name())
    tier.put(b"k", bytes(300))
    tier.put(b"k", b"x" * 50)
    assert tier.usage == 50 and len(tier) == 1
    assert bytes(tier.get(b"k")) == b"x" * 50
    assert tier.delete(b"k") and tier.usage == 0 and not tier.delete(b"k")


def test_stores_a_copy_of_foreign_buffers_and_adopts_its_own_ranges():
    tier = MemoryTier(1 << 20, name=_name())
    buf = bytearray(b"abc" * 10)
    arr = np.arange(256, dtype=np.uint8)
    tier.put(b"ba", buf)
    tier.put(b"np", arr)
    buf[:3] = b"xyz"  # the caller's buffer stays the caller's: the tier holds its own bytes
    assert bytes(tier.get(b"ba")) == b"abc" * 10
    assert bytes(tier.get(b"np")) == arr.tobytes()
    own = tier.allocate(64)
    own[:] = 7
    tier.put(b"own", own)
    assert tier.get(b"own") is own  # a range from allocate is stored as is, no copy
    assert tier.usage == 30 + 256 + 64


def test_on_evict_gets_the_evicted_pairs():
    seen = []
    tier = MemoryTier(200, high_watermark=1.0, low_watermark=1.0, on_evict=lambda k, v: seen.append((k, v)))
    first = bytes(100)
    tier.put(b"a", first)
    tier.put(b"b", bytes(100))
    tier.put(b"c", bytes(100))
    assert len(seen) == 1 and seen[0][0] == b"a" and bytes(seen[0][1]) == first


def test_rejects_bad_watermarks():
    with pytest.raises(ValueError):
        MemoryTier(100, high_watermark=0.5, low_watermark=0.8)


def test_budget_never_exceeded_under_16_threads():
    capacity = 64 * 1024
    tier = MemoryTier(capacity, name=_name())
    stop = threading.Event()
    violations: list[tuple[int, int]] = []

    def sampler():
        # Sum the real buffer sizes under the tier's lock, independent of its own counter.
        while not stop.is_set():
            with tier._lock:
                real = sum(memoryview(v).nbytes for v, _ in tier._entries.values())
                if real > capacity or real != tier._usage:
                    violations.append((real, tier._usage))

    def hammer(seed: int):
        rng = random.Random(seed)
        for _ in range(1500):
            key = b"k%d" % rng.randrange(300)
            size = rng.choice((1, rng.randrange(1, 4096), rng.randrange(1, capacity // 3), capacity))
            tier.put(key, bytearray(size))
            if rng.random() < 0.05:
                tier.delete(key)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert violations == []
    assert tier.peak_usage <= capacity
    assert tier.peak_usage > capacity * 0.5  # the test did push against the budget
    assert tier.usage == sum(memoryview(tier.peek(k)).nbytes for k in tier.lru_order())
