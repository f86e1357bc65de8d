"""L2 disk tier on real files: framing, budget, corruption, rebuild, crash leftovers, ENOSPC."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid

import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode.core import record
from kvpool.cachenode.server.tiers.disk import DiskTier
from kvpool.cachenode.server.tiers.disk_files import record_size


def _name() -> str:
    return f"disk-{uuid.uuid4().hex[:8]}"


def _metric(metric: str, tier: str) -> float:
    return REGISTRY.get_sample_value(metric, {"tier": tier}) or 0.0


def _files(directory) -> list[str]:
    return sorted(
        os.path.join(root, f) for root, _, files in os.walk(directory) for f in files if f.endswith(".rec")
    )


def _all_files(directory) -> list[str]:
    return sorted(os.path.join(root, f) for root, _, files in os.walk(directory) for f in files)


def test_put_writes_one_framed_record_file(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, name=_name())
    value = os.urandom(5000)
    assert tier.put(b"key-1", value)
    path = tier.path_of(b"key-1")
    assert _files(tmp_path) == [path]
    with open(path, "rb") as f:
        data = f.read()
    assert bytes(record.decode(data, expected_key=b"key-1")) == value
    assert tier.usage == len(data) == record_size(b"key-1", 5000)
    got = tier.get(b"key-1")
    assert bytes(got) == value and got.readonly
    assert tier.get(b"nope") is None


def test_lru_eviction_keeps_budget_and_removes_files(tmp_path):
    size = record_size(b"k0", 1000)
    tier = DiskTier(tmp_path, 3 * size, high_watermark=1.0, low_watermark=1.0, name=_name())
    for i in range(3):
        assert tier.put(b"k%d" % i, bytes(1000))
    assert tier.get(b"k0") is not None  # touch: k1 is now the oldest
    assert tier.put(b"k3", bytes(1000))
    assert tier.lru_order() == [b"k2", b"k0", b"k3"]
    assert not os.path.exists(tier.path_of(b"k1"))
    assert len(_files(tmp_path)) == 3 and tier.usage == 3 * size <= tier.capacity
    assert tier.evictions == 1
    assert not tier.put(b"huge", bytes(3 * size))  # larger than the budget: dropped


def test_watermarks(tmp_path):
    size = record_size(b"k0", 100)
    tier = DiskTier(tmp_path, 10 * size, high_watermark=0.9, low_watermark=0.5, name=_name())
    for i in range(10):
        tier.put(b"k%d" % i, bytes(100))
    assert len(tier) == 5 and tier.usage == 5 * size
    assert len(_files(tmp_path)) == 5


def test_overwrite_adjusts_usage(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, name=_name())
    tier.put(b"k", bytes(4000))
    tier.put(b"k", b"v" * 10)
    assert tier.usage == record_size(b"k", 10) and len(tier) == 1
    assert bytes(tier.get(b"k")) == b"v" * 10


def _flip_byte(path, offset_from_end=1):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
    os.truncate(path, os.path.getsize(path) - 7)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(300))


def _header_lies(path):
    with open(path, "r+b") as f:  # value_len field (offset 8) claims a much larger value
        f.seek(8)
        f.write((1 << 40).to_bytes(8, "little"))


@pytest.mark.parametrize("damage", [_flip_byte, _truncate, _garbage, _header_lies])
def test_corrupt_record_is_a_miss_removed_and_counted(tmp_path, damage):
    name = _name()
    tier = DiskTier(tmp_path, 1 << 20, name=name)
    tier.put(b"good", b"g" * 1000)
    tier.put(b"bad", b"b" * 1000)
    damage(tier.path_of(b"bad"))
    before = _metric("kvpool_tier_corrupt_records_total", name)
    assert tier.get(b"bad") is None
    assert _metric("kvpool_tier_corrupt_records_total", name) == before + 1
    assert not os.path.exists(tier.path_of(b"bad"))
    assert not tier.contains(b"bad") and tier.usage == record_size(b"good", 1000)
    assert bytes(tier.get(b"good")) == b"g" * 1000


def test_record_of_another_key_is_rejected(tmp_path):
    name = _name()
    tier = DiskTier(tmp_path, 1 << 20, name=name)
    tier.put(b"aaaa", b"1" * 100)
    tier.put(b"bbbb", b"2" * 100)  # same key length: only the key bytes differ
    with open(tier.path_of(b"aaaa"), "rb") as f:
        other = f.read()
    with open(tier.path_of(b"bbbb"), "wb") as f:
        f.write(other)
    assert tier.get(b"bbbb") is None
    assert _metric("kvpool_tier_corrupt_records_total", name) == 1
    assert not os.path.exists(tier.path_of(b"bbbb"))


def test_index_rebuild_after_reopen_in_mtime_order(tmp_path):
    first = DiskTier(tmp_path, 1 << 20, name=_name())
    values = {b"k%d" % i: os.urandom(100 + i) for i in range(10)}
    for i, (key, value) in enumerate(values.items()):
        first.put(key, value)
        os.utime(first.path_of(key), (1_000_000 + i, 1_000_000 + i))
    name = _name()
    reopened = DiskTier(tmp_path, 1 << 20, name=name)
    assert len(reopened) == 0
    seconds = reopened.rebuild_index()
    assert seconds >= 0 and REGISTRY.get_sample_value("kvpool_disk_index_rebuild_seconds") == seconds
    assert reopened.lru_order() == list(values)
    assert reopened.usage == first.usage
    assert _metric("kvpool_tier_entries", name) == 10
    for key, value in values.items():
        assert bytes(reopened.get(key)) == value


def test_rebuild_enforces_a_lowered_budget_oldest_first(tmp_path):
    size = record_size(b"k0", 1000)
    first = DiskTier(tmp_path, 1 << 20, name=_name())
    for i in range(10):
        first.put(b"k%d" % i, bytes(1000))
        os.utime(first.path_of(b"k%d" % i), (2_000_000 + i, 2_000_000 + i))
    smaller = DiskTier(tmp_path, 4 * size, high_watermark=1.0, low_watermark=1.0, name=_name())
    smaller.rebuild_index()
    assert smaller.lru_order() == [b"k6", b"k7", b"k8", b"k9"]
    assert smaller.usage == 4 * size
    assert len(_files(tmp_path)) == 4


def test_leftover_temp_file_is_ignored_and_cleaned(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, name=_name())
    tier.put(b"kept", b"x" * 10)
    shard = os.path.dirname(tier.path_of(b"crashed"))
    os.makedirs(shard, exist_ok=True)
    temp = os.path.join(shard, f".{b'crashed'.hex()}.deadbeef.tmp")
    with open(temp, "wb") as f:  # a write that died before its rename
        f.write(record.encode(b"crashed", b"half")[:10])
    reopened = DiskTier(tmp_path, 1 << 20, name=_name())
    reopened.rebuild_index()
    assert not os.path.exists(temp)
    assert reopened.lru_order() == [b"kept"]
    assert reopened.get(b"crashed") is None


def test_delete_cancels_a_write_in_progress(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, name=_name())
    assert not tier.put(b"k", b"v" * 100, still_wanted=lambda: False)
    assert _all_files(tmp_path) == [] and tier.usage == 0 and not tier.contains(b"k")
    tier.put(b"k", b"v")
    assert tier.delete(b"k") and not os.path.exists(tier.path_of(b"k")) and tier.usage == 0


def test_budget_never_exceeded_under_concurrent_writers(tmp_path):
    capacity = 40_000
    tier = DiskTier(tmp_path, capacity, name=_name())
    errors: list[object] = []

    def on_disk() -> int:
        # Under the tier's lock no rename or eviction runs; temp files only grow within their
        # reservation, so this walk sees a consistent upper bound of the bytes on disk.
        total = 0
        with tier._lock:
            for path in _all_files(tmp_path):
                with contextlib.suppress(FileNotFoundError):  # a failed temp file, removed
                    total += os.path.getsize(path)
        return total

    def writer(seed: int):
        try:
            for j in range(25):
                key = b"t%d-%d" % (seed, j % 7)
                tier.put(key, os.urandom((seed * 997 + j * 131) % 9000 + 1))
                if (disk_bytes := on_disk()) > capacity:
                    errors.append(disk_bytes)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and tier.peak_usage <= capacity
    assert tier.usage == sum(os.path.getsize(p) for p in _files(tmp_path))


def test_enospc_degrades_once_reads_go_on_and_recovery_clears(tiny_tmpfs, caplog):
    name = _name()
    tier = DiskTier(tiny_tmpfs, 10 << 20, retry_after=0.0, name=name)  # budget larger than the disk
    chunk = 200 * 1024
    assert tier.put(b"first", b"1" * chunk)
    dropped_before = _metric("kvpool_tier_dropped_writes_total", name)
    caplog.set_level(logging.WARNING, logger="kvpool.cachenode.server.tiers.disk")
    results = [tier.put(b"fill%d" % i, b"f" * chunk) for i in range(8)]
    assert results.count(False) >= 3
    assert tier.degraded and _metric("kvpool_tier_degraded", name) == 1
    assert _metric("kvpool_tier_dropped_writes_total", name) >= dropped_before + 3
    degraded_lines = [r for r in caplog.records if "degraded" in r.getMessage()]
    assert len(degraded_lines) == 1
    assert not [p for p in _all_files(tiny_tmpfs) if p.endswith(".tmp")]  # failed temp files removed
    assert bytes(tier.get(b"first")) == b"1" * chunk
    assert tier.usage == sum(os.path.getsize(p) for p in _files(tiny_tmpfs))
    for key in tier.lru_order():  # make room, as eviction or an operator would
        tier.delete(key)
    assert tier.put(b"again", b"a" * chunk)
    assert not tier.degraded and _metric("kvpool_tier_degraded", name) == 0


def test_degraded_tier_waits_for_the_back_off(tiny_tmpfs):
    tier = DiskTier(tiny_tmpfs, 10 << 20, retry_after=3600, name=_name())
    while tier.put(b"fill%d" % len(tier), b"f" * 300 * 1024):
        pass
    assert tier.degraded
    for key in tier.lru_order():
        tier.delete(key)
    assert not tier.put(b"small", b"s")  # space is back, but the back-off has not passed
    tier._retry_at = 0.0
    assert tier.put(b"small", b"s") and not tier.degraded
