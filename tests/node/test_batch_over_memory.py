"""A put request larger than L1 keeps what fits, as the same values put one at a time would.

Found by the Valkey fault test (issue 22): a 12 MiB batch into an 8 MiB node left L1 empty. The
request's first values were received into L1 ranges; storing the later ones evicted the earlier,
but the request's own list still referred to them, so no range came back and nothing was kept."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.server.node import CacheNode
from kvpool.cachenode.server.tiers.memory import drain

MiB = 1 << 20


@pytest.fixture
def node() -> Iterator[CacheNode]:
    n = CacheNode(
        NodeSettings(
            host="127.0.0.1", port=0, http_port=0, data_port=0, memory=8 * MiB, handoff_deadline=0, nixl="off"
        )
    )
    n.start()
    yield n
    n.stop(handoff=False)


@pytest.mark.parametrize("data_channel", [True, False], ids=["data-channel", "grpc"])
def test_a_batch_larger_than_memory_keeps_its_newest_values(node, data_channel):
    values = {f"batch-{i:02d}".encode().ljust(32, b"."): os.urandom(MiB + i) for i in range(12)}
    conn = NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=10, use_data_channel=data_channel))
    try:
        conn.put_many(list(values.items()))
        got = conn.get_many(list(values))
    finally:
        conn.close()
    assert all(got[k] == values[k] for k in got)
    assert len(got) >= 5  # 8 MiB holds 7 values of 1 MiB less its low watermark: was 0
    assert list(values)[-1] in got  # the newest is kept, as with one put at a time


def test_drain_hands_out_each_pair_once_in_order_and_empties_the_list():
    pairs = [(b"a", 1), (b"b", 2), (b"c", 3)]
    assert list(drain(pairs)) == [(b"a", 1), (b"b", 2), (b"c", 3)]
    assert pairs == []
