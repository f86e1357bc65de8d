"""Nodes come and go; the pool's knowledge stays: a node with empty memory and an empty disk
serves every value another node stored, from Valkey, from S3, and from each alone."""

from __future__ import annotations

import os

import pytest

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.server.tiers.shared import PolicyTier, SharedTier
from kvpool.cachenode.server.tiers.shared_factory import build_shared_tiers
from kvpool.cachenode.server.tiers.store import TieredStore

MiB = 1024 * 1024


@pytest.fixture()
def pool_options(valkey_server, s3_server):
    bucket = s3_server.new_bucket()
    return dict(
        pool_name=f"truth-{os.urandom(3).hex()}",
        redis_url=valkey_server.url,
        redis_part_size="1MiB",
        s3_url=f"s3://{bucket}",
        s3_endpoint=s3_server.endpoint,
        s3_part_size="5MiB",
        s3_read_part_size="2MiB",
        s3_multipart_threshold="6MiB",
    )


def values() -> dict[bytes, bytes]:
    sizes = [1, 1000, 64 * 1024, MiB, 3 * MiB + 7, 7 * MiB]
    return {b"chunk-%02d" % i: os.urandom(sizes[i % len(sizes)]) for i in range(12)}


@pytest.mark.parametrize("order", ["redis,s3", "redis", "s3"])
def test_fresh_node_serves_what_another_node_stored(pool_options, tmp_path, order):
    cfg = SharedTiersConfig.from_options(**pool_options, tier_order=order)
    tiers = build_shared_tiers(cfg)
    assert [t.name for t in tiers] == order.split(",")
    assert all(isinstance(t, SharedTier) and isinstance(t, PolicyTier) for t in tiers)
    data = values()
    with TieredStore(256 * MiB, str(tmp_path / "a"), 256 * MiB, shared_tiers=tiers) as old:
        assert old.put_many(data) == len(data)
        assert old.flush(60)
    # a new node: empty memory, empty disk dir, its own connections
    fresh_tiers = build_shared_tiers(cfg)
    with TieredStore(256 * MiB, str(tmp_path / "b"), 256 * MiB, shared_tiers=fresh_tiers) as fresh:
        got = fresh.get_many(list(data))
        assert [bytes(v) if v is not None else None for v in got] == list(data.values())
        stats = fresh.stats()
        assert sum(stats["tiers"][name]["hits"] for name in order.split(",")) == len(data)
        # promoted: the second read is served locally
        assert [bytes(v) for v in fresh.get_many(list(data))] == list(data.values())
        assert sum(fresh.stats()["tiers"][name]["hits"] for name in order.split(",")) == len(data)


def test_s3_serves_when_valkey_lost_everything(pool_options, valkey_server, tmp_path):
    cfg = SharedTiersConfig.from_options(**pool_options)
    data = values()
    with TieredStore(256 * MiB, shared_tiers=build_shared_tiers(cfg)) as old:
        old.put_many(data)
        assert old.flush(60)
    valkey_server.client().flushall()
    with TieredStore(256 * MiB, shared_tiers=build_shared_tiers(cfg)) as fresh:
        assert [bytes(v) for v in fresh.get_many(list(data))] == list(data.values())
        assert fresh.stats()["tiers"]["s3"]["hits"] == len(data)


def test_write_back_writes_only_on_demotion(pool_options):
    cfg = SharedTiersConfig.from_options(**pool_options, tier_write="back", tier_order="redis")
    [tier] = build_shared_tiers(cfg)
    try:
        tier.submit_put(b"k", b"only local")
        assert tier.flush(5)
        assert tier.get_many([b"k"]) == [None]
        tier.demote(b"k", b"evicted")
        assert tier.flush(5)
        assert bytes(tier.get_many([b"k"])[0]) == b"evicted"
    finally:
        tier.close()
    through = build_shared_tiers(SharedTiersConfig.from_options(**pool_options, tier_order="redis"))[0]
    try:
        through.demote(b"d", b"already written through")
        assert through.flush(5)
        assert through.get_many([b"d"]) == [None]  # write-through does not write twice
        assert through.promote_on_read is True
    finally:
        through.close()
