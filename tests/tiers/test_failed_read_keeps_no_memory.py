"""A shared tier that is down must not hold on to the memory of the read that asked it.

Found by the Valkey-under-a-node test (issue 22, item 5): with Valkey killed, values put right
after a read were acknowledged and then not found. valkey-py's connect keeps the refused
connection's exception in a local of its own frame (``err = e`` ... ``raise err``), a reference
cycle that only the cyclic garbage collector breaks. A frame that outlives its call keeps its
callers' frames (``f_back``), so the cycle also kept ``TieredStore.get_many``'s results, which
are views of L1 ranges, until the next collection. Meanwhile ``allocate`` found L1 full of
ranges nobody could use, evicted every entry (which freed nothing) and the put's values went
to the heap; ``memory.put`` could not place them, so they were acknowledged with only a dead
tier's queue holding them. botocore's retries keep each failed attempt's exception the same way.
A shared tier's read now runs on a reader thread of its own and its error comes back as a value
(``BackgroundTier.get_many``), so no such chain reaches the request's frames.

The cyclic collector is switched off in these tests, so they show what reference counting
alone frees (what a busy node gets between two collections), not what a collection happens to
find.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from kvpool.cachenode.core import metrics
from kvpool.cachenode.server.tiers.shared_factory import build_shared_tiers
from kvpool.cachenode.server.tiers.store import TieredStore
from kvpool.cli.devtools.local_servers import free_port

MiB = 1 << 20


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@pytest.fixture(params=["redis", "s3"])
def store_with_a_dead_tier(request, make_config) -> Iterator[tuple[TieredStore, str]]:
    """8 MiB of L1 before a Valkey or S3 tier whose port nobody listens on (connection refused).
    Write-back, so that no write-through attempt opens the breaker before the read is sent."""
    tier, url = request.param, f"127.0.0.1:{free_port()}"
    if tier == "s3":
        request.getfixturevalue("aws_env")
        options = dict(s3_url="s3://kvpool-dead/p", s3_endpoint=f"http://{url}", s3_timeout=1.0)
    else:
        options = dict(redis_url=f"redis://{url}/0")
    cfg = make_config(pool_name="dead", tier_order=tier, tier_write="back", **options)
    with TieredStore(8 * MiB, shared_tiers=build_shared_tiers(cfg)) as store:
        yield store, tier


def failed_reads(tier: str) -> float:
    return sum(metrics.TIER_ERRORS.labels(tier, kind)._value.get() for kind in ("get", "timeout"))


def chunks(prefix: str, n: int) -> dict[bytes, bytes]:
    return {f"{prefix}-{i:03d}".encode().ljust(32, b"."): os.urandom(MiB + i) for i in range(n)}


def test_a_read_that_asked_a_dead_tier_leaves_no_range_behind(store_with_a_dead_tier, no_cyclic_gc):
    store, tier = store_with_a_dead_tier
    early = chunks("early", 6)
    assert store.put_many(early) == 6
    failed = failed_reads(tier)
    got = store.get_many([*early, b"never-put".ljust(32, b".")])  # the miss goes to the tier: refused
    assert [None if v is None else bytes(v) for v in got] == [*early.values(), None]
    del got
    assert failed_reads(tier) == failed + 1  # the tier was asked, and the call failed
    store.memory.clear()
    assert store.memory.arena_used == 0  # was 6 MiB: the values the read returned, kept by a cycle


def test_values_put_after_a_failed_read_stay_in_memory(store_with_a_dead_tier, no_cyclic_gc):
    store, tier = store_with_a_dead_tier
    early, late = chunks("early", 6), chunks("late", 4)
    store.put_many(early)
    failed = failed_reads(tier)
    got = store.get_many([*early, b"never-put".ljust(32, b".")])
    del got
    assert failed_reads(tier) == failed + 1
    assert store.put_many(late) == 4
    assert all(store.memory.contains(k) for k in late)  # 4 MiB into 8 MiB: was none of them
    assert [bytes(v) for v in store.get_many(list(late))] == list(late.values())
    memory = store.stats()["tiers"]["memory"]
    assert memory["used"] <= memory["capacity"]
