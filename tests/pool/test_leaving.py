"""A node that is leaving (SIGTERM, handing over) still serves reads but takes no puts: clients
that have not heard yet are told so by the put itself and place the value on the next owner."""

from __future__ import annotations

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.core.placement import Placement
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.server.node import CacheNode
from kvpool.cli.devtools.local_servers import free_port

from ..nixl.conftest import nixl_or_skip
from .conftest import values, wait_until


@pytest.mark.parametrize("transport", ["grpc", "nixl"], ids=["data-channel", "nixl"])
def test_a_leaving_node_serves_reads_and_sends_puts_elsewhere(transport):
    if transport == "nixl":
        nixl_or_skip()  # a NIXL put reserves room first: the reservation is refused as well
    ports = [free_port(), free_port()]
    nodes = []
    try:
        for i, port in enumerate(ports):
            other = ports[1 - i]
            settings = NodeSettings(
                host="127.0.0.1", port=port, http_port=0, data_port=0, memory=64 << 20,
                node_id=f"m{i}", peers=f"127.0.0.1:{other}", handoff_deadline=0,
            )  # fmt: skip
            nodes.append(CacheNode(settings))
        for node in nodes:
            node.start()
        wait_until(lambda: all(n.peers.view == {"m0", "m1"} for n in nodes), what="two members")
        placement = Placement(["m0", "m1"])
        data = values("leaving", 100)
        with Client(
            f"grpc://127.0.0.1:{ports[0]}", refresh_interval=60, transport=transport
        ) as client:  # hears nothing by itself
            client.put_many(data)
            nodes[1].leave()  # deadline 0: nothing is pushed, it only stops taking puts
            assert nodes[1].put_refusal()
            assert client.get_many(list(data)) == data  # m1's chunks are still read from it
            more = values("leaving-more", 100)
            client.put_many(more)  # m1 refuses its share; the client puts it on m0
            assert client.get_many(list(more)) == more
            theirs = [k for k in more if placement.owner(k) == "m1"]
            assert theirs and all(nodes[0].store.contains(k) for k in theirs)
            assert not any(nodes[1].store.contains(k) for k in theirs)
            assert {m["node_id"]: m["state"] for m in client.members()}["m1"] == "leaving"
    finally:
        for node in nodes:
            node.stop(handoff=False)
