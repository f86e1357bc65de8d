"""The store under the shared-tier policy, against a real valkey-server: write-back demotes what
leaves the last local tier (L1 without a disk, L2 with one), --no-tier-promote serves shared hits
without copying them locally, and stats() carries each tier's breaker and queue."""

from __future__ import annotations

import os

from kvpool.cachenode.server.tiers.disk_files import record_size
from kvpool.cachenode.server.tiers.redis import RedisTier
from kvpool.cachenode.server.tiers.shared_factory import build_shared_tiers
from kvpool.cachenode.server.tiers.store import TieredStore

VALUE = 1000  # bytes per value; budgets below are counted in these


def values(n: int, prefix: bytes = b"k") -> dict[bytes, bytes]:
    return {prefix + b"%03d" % i: os.urandom(VALUE) for i in range(n)}


def pool() -> str:
    return f"policy-{os.urandom(3).hex()}"


def in_valkey(server, tier: RedisTier, keys) -> set[bytes]:
    """Keys whose head is in Valkey, asked of the server itself (not through the store)."""
    client = server.client()
    return {k for k in keys if client.exists(tier.head_key(k))}


def read_back(cfg, keys) -> list[bytes | None]:
    """Values as a new node reads them: fresh tier connections, verified records."""
    tier = RedisTier(cfg.redis, cfg.policy)
    try:
        return [None if v is None else bytes(v) for v in tier.get_many(list(keys))]
    finally:
        tier.close()


def test_write_back_without_disk_demotes_l1_evictions(valkey_server, make_config):
    cfg = make_config(redis_url=valkey_server.url, pool_name=pool(), tier_order="redis", tier_write="back")
    data = values(20)
    keys = list(data)
    with TieredStore(
        10 * VALUE, shared_tiers=build_shared_tiers(cfg), high_watermark=1.0, low_watermark=1.0
    ) as s:
        (tier,) = s.shared
        assert s.put_many({k: data[k] for k in keys[:10]}) == 10  # fits L1 exactly: nothing evicted
        assert s.flush(10) and in_valkey(valkey_server, tier, keys) == set()
        assert s.put_many({k: data[k] for k in keys[10:]}) == 10  # evicts the first ten
        assert s.flush(10)
        assert all(not s.memory.contains(k) for k in keys[:10])
        assert in_valkey(valkey_server, tier, keys) == set(keys[:10])  # the L1-resident ten are not
        assert read_back(cfg, keys[:10]) == [data[k] for k in keys[:10]]
        stats = s.stats()
        assert stats["demotions"] == 10 and stats["tiers"]["redis"]["written"] == 10
        big = os.urandom(20 * VALUE)  # larger than L1: no local tier takes it, demoted at once
        assert s.put(b"big", big)
        assert s.flush(10) and read_back(cfg, [b"big"]) == [big]
    with TieredStore(10 * VALUE, shared_tiers=build_shared_tiers(cfg)) as fresh:  # empty memory
        assert [bytes(v) for v in fresh.get_many(keys[:10])] == [data[k] for k in keys[:10]]
        assert fresh.stats()["tiers"]["redis"]["hits"] == 10
        assert fresh.get_many(keys[10:]) == [None] * 10  # only ever local (L1 of the closed node)


def test_write_back_with_disk_demotes_l2_evictions(valkey_server, make_config, tmp_path):
    cfg = make_config(redis_url=valkey_server.url, pool_name=pool(), tier_order="redis", tier_write="back")
    data = values(20)
    keys = list(data)
    disk = 8 * record_size(keys[0], VALUE)  # eight records
    with TieredStore(
        4 * VALUE,
        str(tmp_path / "a"),
        disk,
        shared_tiers=build_shared_tiers(cfg),
        high_watermark=1.0,
        low_watermark=1.0,
    ) as s:
        (tier,) = s.shared
        assert s.put_many({k: data[k] for k in keys[:8]}) == 8  # L1 evicts four, all on disk
        assert s.flush(10) and in_valkey(valkey_server, tier, keys) == set()  # L1 evictions: no
        assert s.disk.evictions == 0 and s.memory.evictions == 4
        assert s.put_many({k: data[k] for k in keys[8:]}) == 12
        assert s.flush(10)
        on_disk = {k for k in keys if s.disk.contains(k)}
        assert on_disk == set(keys[12:]) and s.disk.evictions == 12
        assert in_valkey(valkey_server, tier, keys) == set(keys[:12])  # exactly what left L2
        assert read_back(cfg, keys[:12]) == [data[k] for k in keys[:12]]
        # no local tier can hold it (too big for L1 and for the disk): the failed disk write demotes
        big = os.urandom(disk)
        assert s.put(b"big", big)
        assert s.flush(10) and not s.disk.contains(b"big") and read_back(cfg, [b"big"]) == [big]
    with TieredStore(4 * VALUE, str(tmp_path / "b"), disk, shared_tiers=build_shared_tiers(cfg)) as fresh:
        assert [bytes(v) for v in fresh.get_many(keys[:12])] == [data[k] for k in keys[:12]]
        assert fresh.get_many(keys[12:]) == [None] * 8  # still only on the old node's disk


def test_no_tier_promote_serves_shared_hits_without_copying(valkey_server, make_config, tmp_path):
    cfg = make_config(redis_url=valkey_server.url, pool_name=pool(), tier_order="redis", tier_promote=False)
    data = values(3)
    with TieredStore(1 << 20, shared_tiers=build_shared_tiers(cfg)) as writer:  # write-through
        assert writer.put_many(data) == 3 and writer.flush(10)
    with TieredStore(1 << 20, str(tmp_path), 1 << 20, shared_tiers=build_shared_tiers(cfg)) as s:
        for _ in range(2):
            assert [bytes(v) for v in s.get_many(list(data))] == list(data.values())
        assert s.flush(10)
        assert not any(s.memory.contains(k) or s.disk.contains(k) for k in data)
        stats = s.stats()
        assert stats["tiers"]["redis"]["hits"] == 6 and stats["tiers"]["redis"]["promote"] is False
        assert stats["tiers"]["memory"]["entries"] == 0 and stats["tiers"]["disk"]["entries"] == 0


def test_stats_carry_breaker_and_queue(own_valkey, make_config):
    cfg = make_config(redis_url=own_valkey.url, pool_name=pool(), tier_order="redis")
    with TieredStore(1 << 20, shared_tiers=build_shared_tiers(cfg)) as s:
        assert s.put(b"a", b"x" * 100) and s.flush(10)
        redis = s.stats()["tiers"]["redis"]
        assert {
            k: redis[k] for k in ("breaker", "queue_depth", "written", "dropped", "degraded", "write")
        } == {
            "breaker": "closed",
            "queue_depth": 0,
            "written": 1,
            "dropped": 0,
            "degraded": False,
            "write": "through",
        }
        own_valkey.kill()
        for _ in range(cfg.policy.breaker_failures):
            assert s.get_many([b"absent"]) == [None]
        redis = s.stats()["tiers"]["redis"]
        assert redis["breaker"] == "open" and redis["degraded"] is True and redis["misses"] >= 1
