"""TieredStore on real files and threads: write-through, promotion, races, shared tiers, ENOSPC."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.server.tiers.disk import DiskTier
from kvpool.cachenode.server.tiers.store import TieredStore


def _metric(metric: str, tier: str) -> float:
    return REGISTRY.get_sample_value(metric, {"tier": tier}) or 0.0


def _on_disk(directory, key: bytes) -> bytes | None:
    """What a fresh disk tier over the same directory reads for a key."""
    tier = DiskTier(directory, 1 << 30, name="probe")
    tier.rebuild_index()
    value = tier.get(key)
    return None if value is None else bytes(value)


class DictTier:
    """A real, in-process shared tier (the SharedTier protocol over a dict)."""

    def __init__(self, name: str = "shared") -> None:
        self.name = name
        self.data: dict[bytes, bytes] = {}
        self.get_calls = 0

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self.get_calls += 1
        return [self.data.get(k) for k in keys]

    def submit_put(self, key: bytes, value) -> None:
        self.data[key] = bytes(value)

    def delete(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            self.data.pop(k, None)

    def flush(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


class Gate:
    """Holds the store's writer thread at the door of the real disk tier until opened."""

    def __init__(self, store: TieredStore) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()
        self._put = store.disk.put
        store.disk.put = self._gated_put

    def _gated_put(self, key, value, still_wanted=None):
        self.entered.set()
        assert self.open.wait(10)
        return self._put(key, value, still_wanted=still_wanted)


@pytest.fixture
def store(tmp_path):
    with TieredStore(1 << 20, str(tmp_path), 4 << 20, disk_flush_interval=0.05) as s:
        yield s


def test_put_get_bytes_equal_and_read_only(store):
    assert store.ready  # started by the fixture
    value = bytearray(os.urandom(10_000))
    assert store.put(b"k", value)
    got = store.get(b"k")
    assert bytes(got) == bytes(value)
    with pytest.raises(TypeError):
        got[0] = 1
    assert store.get(b"missing") is None
    assert store.get_many([b"k", b"missing", b"k"])[1] is None


def test_write_through_lands_on_disk_within_a_second_without_flush(store, tmp_path):
    value = os.urandom(50_000)
    store.put(b"wt", value)
    deadline = time.monotonic() + 1.0
    while not store.disk.contains(b"wt") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.disk.contains(b"wt")
    assert _on_disk(tmp_path, b"wt") == value


def test_flush_waits_for_pending_writes(store, tmp_path):
    for i in range(20):
        store.put(b"f%d" % i, os.urandom(1000))
    assert store.flush(5)
    assert store.stats()["pending_writes"] == 0
    assert len(store.disk) == 20


def test_read_promotes_l2_hit_into_l1(tmp_path):
    with TieredStore(64 * 1024, str(tmp_path), 1 << 20, high_watermark=1.0, low_watermark=1.0) as s:
        values = {b"p%d" % i: os.urandom(30_000) for i in range(4)}
        for k, v in values.items():
            s.put(k, v)
        assert s.flush(5)
        assert not s.memory.contains(b"p0")  # evicted from L1, still on disk
        hits_before = _metric("kvpool_tier_hits_total", "disk")
        assert bytes(s.get(b"p0")) == values[b"p0"]
        assert s.memory.contains(b"p0")
        assert _metric("kvpool_tier_hits_total", "disk") == hits_before + 1
        assert s.stats()["tiers"]["disk"]["hits"] == 1


def test_restart_reads_back_from_disk(tmp_path):
    with TieredStore(1 << 20, str(tmp_path), 1 << 20) as s:
        s.put(b"durable", b"d" * 4096)
    s2 = TieredStore(1 << 20, str(tmp_path), 1 << 20)
    assert not s2.ready
    with s2:
        assert s2.ready
        assert s2.prefix_hits([b"durable", b"nope"]) == 1
        assert bytes(s2.get(b"durable")) == b"d" * 4096
    assert not s2.ready


def test_value_too_big_for_l1_still_goes_to_disk(tmp_path):
    with TieredStore(1000, str(tmp_path), 1 << 20) as s:
        assert s.put(b"big", b"B" * 5000)
        assert not s.memory.contains(b"big")
        assert s.flush(5)
        assert bytes(s.get(b"big")) == b"B" * 5000


def test_delete_of_a_pending_write_does_not_reach_disk(store, tmp_path):
    gate = Gate(store)
    store.put(b"first", b"1")  # the writer takes it and waits at the gate
    assert gate.entered.wait(5)
    store.put(b"victim", b"v" * 100)  # pending behind it
    assert store.delete([b"victim"]) == 1
    assert store.get(b"victim") is None
    gate.open.set()
    assert store.flush(5)
    assert not store.disk.contains(b"victim") and _on_disk(tmp_path, b"victim") is None
    assert _on_disk(tmp_path, b"first") == b"1"


def test_delete_of_a_write_in_flight_does_not_resurrect(store, tmp_path):
    gate = Gate(store)
    store.put(b"victim", b"v" * 100)  # the writer has taken this one: it is in flight
    assert gate.entered.wait(5)
    assert store.delete([b"victim"]) == 1
    gate.open.set()
    assert store.flush(5)
    assert not store.disk.contains(b"victim") and _on_disk(tmp_path, b"victim") is None
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert leftovers == []


def test_overwrite_while_older_write_in_flight_leaves_newest_on_disk(store, tmp_path):
    gate = Gate(store)
    store.put(b"k", b"old" * 10)
    assert gate.entered.wait(5)
    store.put(b"k", b"new" * 10)
    gate.open.set()
    assert store.flush(5)
    assert _on_disk(tmp_path, b"k") == b"new" * 10
    assert bytes(store.get(b"k")) == b"new" * 10


def test_disk_queue_is_bounded_in_bytes_oldest_dropped(tmp_path):
    with TieredStore(1 << 20, str(tmp_path), 4 << 20, disk_queue_bytes=10_000) as s:
        gate = Gate(s)
        s.put(b"blocker", b"x")
        assert gate.entered.wait(5)
        dropped_before = _metric("kvpool_tier_dropped_writes_total", "disk")
        for i in range(10):
            assert s.put(b"q%d" % i, bytes(3000))  # acknowledged, never blocked
        stats = s.stats()
        assert stats["pending_write_bytes"] <= 10_000 and stats["pending_writes"] == 3
        assert stats["dropped_writes"] == 7
        assert _metric("kvpool_tier_dropped_writes_total", "disk") == dropped_before + 7
        gate.open.set()
        assert s.flush(5)
        assert sorted(k for k in (b"q%d" % i for i in range(10)) if s.disk.contains(k)) == [
            b"q7",
            b"q8",
            b"q9",
        ]
        assert all(bytes(s.get(b"q%d" % i)) == bytes(3000) for i in range(10))  # all still in L1


def test_shared_tiers_written_read_promoted_and_not_asked_for_prefix(tmp_path):
    shared = DictTier("shared-a")
    with TieredStore(1 << 20, str(tmp_path), 1 << 20, shared_tiers=[shared]) as s:
        s.put(b"mine", b"m" * 10)
        assert shared.data[b"mine"] == b"m" * 10
        shared.data[b"remote"] = b"r" * 200  # written by another node
        assert s.prefix_hits([b"mine", b"remote"]) == 1
        assert not s.contains(b"remote")
        assert shared.get_calls == 0
        got = s.get_many([b"mine", b"remote", b"absent"])
        assert bytes(got[0]) == b"m" * 10 and bytes(got[1]) == b"r" * 200 and got[2] is None
        assert shared.get_calls == 1  # one batched call for both missing keys
        assert s.memory.contains(b"remote")
        assert s.flush(5) and s.disk.contains(b"remote")
        assert s.stats()["tiers"]["shared-a"] == {
            "capacity": None,
            "used": None,
            "entries": None,
            "hits": 1,
            "misses": 1,
            "evictions": None,
            "degraded": None,
        }
        assert s.delete([b"remote"]) == 1
        assert b"remote" not in shared.data and s.get(b"remote") is None


def test_prefix_hits_counts_leading_keys_only(store):
    store.put(b"a", b"1")
    store.put(b"c", b"3")
    assert store.prefix_hits([b"a", b"b", b"c"]) == 1
    assert store.prefix_hits([b"b", b"a"]) == 0
    assert store.prefix_hits([]) == 0


def test_bad_keys_are_refused(store):
    with pytest.raises(InvalidRequest):
        store.put(b"", b"x")
    with pytest.raises(InvalidRequest):
        store.get(b"k" * 65)
    with pytest.raises(InvalidRequest):
        store.put("text", b"x")


def test_stats_shape(store):
    store.put(b"s", b"x" * 100)
    store.get(b"s")
    store.get(b"nope")
    assert store.flush(5)
    stats = store.stats()
    assert stats["ready"] is True and stats["pending_writes"] == 0
    mem, disk = stats["tiers"]["memory"], stats["tiers"]["disk"]
    assert (mem["capacity"], mem["used"], mem["entries"], mem["hits"], mem["misses"]) == (
        1 << 20,
        100,
        1,
        1,
        1,
    )
    assert (disk["entries"], disk["misses"], disk["degraded"]) == (1, 1, False)
    assert disk["used"] > 100


def test_memory_only_store(tmp_path):
    with TieredStore(1 << 20) as s:
        assert s.put(b"k", b"v") and bytes(s.get(b"k")) == b"v"
        assert s.flush(1) and "disk" not in s.stats()["tiers"]


def test_disk_full_keeps_serving_from_memory(tiny_tmpfs):
    with TieredStore(8 << 20, str(tiny_tmpfs), 64 << 20) as s:
        values = {b"v%d" % i: os.urandom(300 * 1024) for i in range(6)}
        for k, v in values.items():
            assert s.put(k, v)
        assert s.flush(5)
        assert s.stats()["tiers"]["disk"]["degraded"] is True
        assert _metric("kvpool_tier_degraded", "disk") == 1
        assert all(bytes(s.get(k)) == v for k, v in values.items())
