"""Leases: the pure table (with a fake clock) and a real TieredStore that keeps pinned keys."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode.core.leases import LeaseTable
from kvpool.cachenode.server.tiers.store import TieredStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _gauge() -> float:
    return REGISTRY.get_sample_value("kvpool_pinned_bytes") or 0.0


# -- the table ------------------------------------------------------------------------------------


def test_pins_count_each_key_once_and_end_with_the_last_release():
    t = LeaseTable(Clock())
    a, b = t.open(10), t.open(10)
    assert a != b
    t.pin(a, b"k1", 100)
    t.pin(a, b"k2", 50)
    t.pin(b, b"k1", 100)  # two readers found the same key
    assert t.pinned_bytes() == 150 and len(t) == 2
    assert t.release(a, [b"k1"]) == 1
    assert t.is_pinned(b"k1")  # lease b still holds it
    assert t.pinned_bytes() == 150
    assert t.release(b) == 1
    assert not t.is_pinned(b"k1") and t.is_pinned(b"k2")
    assert t.pinned_bytes() == 50 and len(t) == 1
    assert t.release(a) == 1  # the last key: the lease ends
    assert t.pinned_bytes() == 0 and len(t) == 0
    assert t.release(a) == 0  # a late release is harmless


def test_a_lease_that_is_never_released_expires():
    clock = Clock()
    t = LeaseTable(clock)
    a = t.open(5)
    t.pin(a, b"k", 10)
    long = t.open(60)
    t.pin(long, b"other", 7)
    clock.now += 4.9
    assert t.is_pinned(b"k")
    clock.now += 0.2
    assert not t.is_pinned(b"k")  # expired: eviction may take it
    assert t.is_pinned(b"other")
    assert t.pinned_bytes() == 7 and len(t) == 1
    assert t.expired == 1  # counted: a pinned chunk nobody read in time
    t.release(long)
    assert t.expired == 1  # a released lease is not an expired one
    assert t.pin(a, b"k", 10) is False  # an expired lease takes no new pins
    assert t.release(a) == 0


def test_release_of_keys_the_lease_does_not_hold_changes_nothing():
    t = LeaseTable(Clock())
    a = t.open(10)
    t.pin(a, b"k", 10)
    assert t.release(a, [b"x", b"y"]) == 0
    assert t.is_pinned(b"k") and t.pinned_bytes() == 10


@pytest.mark.parametrize("ttl", [0, -1, 601])
def test_bad_ttl_is_refused(ttl):
    with pytest.raises(ValueError, match="TTL"):
        LeaseTable().open(ttl)


# -- the store ------------------------------------------------------------------------------------


def _fill(store: TieredStore, n: int, size: int, prefix: bytes = b"k") -> list[bytes]:
    keys = [prefix + b"%03d" % i for i in range(n)]
    for k in keys:
        store.put(k, bytes([len(k)]) * size)
    return keys


def test_a_pinned_key_survives_memory_pressure_and_is_released_by_the_reader():
    before = _gauge()
    with TieredStore(10_000) as store:
        keys = _fill(store, 5, 1000)
        count, lease = store.lease_prefix(keys[:3], ttl_s=30)
        assert count == 3 and lease > 0
        assert store.stats()["pinned_bytes"] == 3000
        assert _gauge() - before == 3000
        _fill(store, 20, 1000, prefix=b"new")  # far more than the budget: LRU would drop k000..
        assert store.memory.usage <= store.memory.capacity
        assert all(store.contains(k) for k in keys[:3])  # pinned: kept
        assert not any(store.contains(k) for k in keys[3:])  # not pinned: evicted
        assert all(v is not None for v in store.get_many(keys[:3]))
        assert store.release(lease) == 3
        assert store.stats()["pinned_bytes"] == 0 and _gauge() == before
        _fill(store, 20, 1000, prefix=b"more")
        assert not any(store.contains(k) for k in keys[:3])  # released: ordinary LRU again


def test_lease_counts_only_the_leading_run_and_pins_nothing_on_a_miss():
    with TieredStore(10_000) as store:
        keys = _fill(store, 3, 100)
        count, lease = store.lease_prefix([keys[0], b"absent", keys[1]], ttl_s=5)
        assert count == 1
        assert store.leases.is_pinned(keys[0]) and not store.leases.is_pinned(keys[1])
        store.release(lease)
        assert store.lease_prefix([b"absent", keys[0]], ttl_s=5) == (0, 0)
        assert store.stats()["leases"] == 0


def test_partial_release_per_reader_keeps_the_rest_pinned():
    """Each tensor-parallel worker releases the keys of its own shard."""
    with TieredStore(10_000) as store:
        keys = _fill(store, 4, 100)
        _, lease = store.lease_prefix(keys, ttl_s=5)
        assert store.release(lease, keys[0::2]) == 2
        assert [store.leases.is_pinned(k) for k in keys] == [False, True, False, True]
        assert store.release(lease, keys[1::2]) == 2
        assert store.stats()["leases"] == 0


def test_a_put_that_only_pinned_keys_could_make_room_for_is_refused():
    with TieredStore(3000, high_watermark=1.0, low_watermark=1.0) as store:
        keys = _fill(store, 3, 1000)
        _, lease = store.lease_prefix(keys, ttl_s=5)
        assert store.memory.put(b"big", b"x" * 1000) is False  # no room without evicting a pin
        assert store.memory.usage <= store.memory.capacity
        assert all(store.contains(k) for k in keys)
        store.release(lease)
        assert store.memory.put(b"big", b"x" * 1000) is True


def test_pinned_keys_stay_on_disk_too(tmp_path):
    with TieredStore(0, disk_dir=str(tmp_path), disk_bytes=12_000, disk_flush_interval=0.01) as store:
        keys = _fill(store, 4, 2000)
        assert store.flush()
        count, lease = store.lease_prefix(keys[:2], ttl_s=30)
        assert count == 2
        _fill(store, 10, 2000, prefix=b"new")
        assert store.flush()
        assert store.disk.usage <= store.disk.capacity
        assert all(store.disk.contains(k) for k in keys[:2])
        assert not any(store.disk.contains(k) for k in keys[2:])
        store.release(lease)


def test_expired_leases_unpin_and_the_gauge_returns_to_zero():
    before = _gauge()
    with TieredStore(10_000) as store:
        clock = Clock()
        store.leases._clock = clock  # the table's clock only; the store keeps real time
        keys = _fill(store, 2, 500)
        store.lease_prefix(keys, ttl_s=2)
        assert _gauge() - before == 1000
        clock.now += 3
        assert store.stats()["pinned_bytes"] == 0 and store.stats()["leases"] == 0
        assert _gauge() == before


def test_closing_a_store_with_live_leases_leaves_no_pinned_bytes_behind():
    before = _gauge()
    store = TieredStore(10_000).start()
    keys = _fill(store, 2, 500)
    store.lease_prefix(keys, ttl_s=60)
    assert _gauge() - before == 1000
    store.close()
    assert _gauge() == before


def test_concurrent_leases_and_puts_never_evict_a_pinned_key():
    with TieredStore(50_000) as store:
        keys = _fill(store, 10, 1000)
        stop = threading.Event()
        failures: list[str] = []

        def writer() -> None:
            i = 0
            while not stop.is_set():
                store.put(b"w%06d" % i, b"w" * 1000)
                i += 1

        def reader() -> None:
            for _ in range(300):
                count, lease = store.lease_prefix(keys, ttl_s=30)
                found = store.get_many(keys[:count])
                if any(v is None for v in found):
                    failures.append("a pinned key vanished before its get")
                store.release(lease)

        threads = [threading.Thread(target=writer) for _ in range(2)]
        for t in threads:
            t.start()
        reader()
        stop.set()
        for t in threads:
            t.join()
        assert not failures
        assert store.memory.peak_usage <= store.memory.capacity
        assert store.stats()["pinned_bytes"] == 0
