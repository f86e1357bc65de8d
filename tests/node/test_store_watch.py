"""TieredStore.watch: a listener hears what starts and stops being held locally, and local_keys()
is the snapshot those events keep current (what a holder publishes to the lookup service)."""

from __future__ import annotations

import threading

from kvpool.cachenode.server.tiers.store import TieredStore


class Recorder:
    """Applies events to a set, as the lookup index would."""

    def __init__(self) -> None:
        self.held: set[bytes] = set()
        self.admits = 0
        self.evicts = 0
        self.lock = threading.Lock()

    def admitted(self, keys) -> None:
        with self.lock:
            self.admits += 1
            self.held.update(keys)

    def evicted(self, keys) -> None:
        with self.lock:
            self.evicts += 1
            self.held.difference_update(keys)


def key(i: int) -> bytes:
    return f"k{i:05d}".encode()


def test_memory_only_puts_evictions_and_deletes() -> None:
    store = TieredStore(8 * 4096).start()  # holds about 8 values of 4 KiB
    seen = Recorder()
    store.watch(seen)
    try:
        for i in range(20):
            assert store.put(key(i), b"x" * 4096)
            assert seen.held == set(store.local_keys())  # evictions reported as they happen
        assert 0 < len(seen.held) < 20 and seen.evicts > 0
        survivor = next(iter(seen.held))
        assert store.delete([survivor]) == 1
        assert survivor not in seen.held and seen.held == set(store.local_keys())
        evicts = seen.evicts
        assert store.delete([key(999)]) == 0 and seen.evicts == evicts  # nothing held, nothing said
    finally:
        store.close()


def test_a_value_moving_from_memory_to_disk_stays_held(tmp_path) -> None:
    store = TieredStore(2 * 4096, disk_dir=str(tmp_path), disk_bytes=6 * 4200).start()
    seen = Recorder()
    store.watch(seen)
    try:
        for i in range(12):
            store.put(key(i), b"y" * 4096)
            store.flush()
        # L1 keeps 2, L2 about 5: the ones only on disk are still held; the disk's evictions are not
        local = set(store.local_keys())
        assert seen.held == local
        assert len(local) > len(store.memory.lru_order())
        assert len(local) < 12
        # a disk hit promoted back into memory is (still) held
        on_disk_only = next(k for k in local if not store.memory.contains(k))
        assert store.get(on_disk_only) is not None and on_disk_only in seen.held
    finally:
        store.close()


def test_local_keys_lists_each_key_once(tmp_path) -> None:
    store = TieredStore(64 * 1024, disk_dir=str(tmp_path), disk_bytes=1 << 20).start()
    try:
        for i in range(5):
            store.put(key(i), b"z" * 100)
        keys = list(store.local_keys())  # in memory and (pending or written) on disk: listed once
        assert sorted(keys) == [key(i) for i in range(5)]
    finally:
        store.close()


def test_no_listener_no_events_after_unwatch() -> None:
    store = TieredStore(1 << 20).start()
    seen = Recorder()
    store.watch(seen)
    store.put(key(1), b"a")
    store.watch(None)
    store.put(key(2), b"b")
    store.delete([key(1)])
    assert seen.held == {key(1)} and seen.admits == 1 and seen.evicts == 0
    store.close()
