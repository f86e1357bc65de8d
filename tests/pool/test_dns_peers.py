"""`--peers <name>` where one DNS name resolves to every member, as a headless Service does:
three nodes on 127.0.0.1, .2 and .3 (all loopback on Linux), the same port, one name.

The nodes run in this process so that the name can resolve without a DNS server: the resolver
the nodes use (`socket.getaddrinfo`) answers the name with the members' addresses, and the
answer grows when a member is added, as the Service's does when a pod becomes ready.
"""

from __future__ import annotations

import socket

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.server import peers
from kvpool.cachenode.server.node import CacheNode
from kvpool.cli.devtools.local_servers import free_port

from .conftest import values, wait_until

NAME = "kvpool-pool-headless.test"


@pytest.fixture
def dns(monkeypatch):
    """The headless Service's answer: starts empty, tests add addresses."""
    answer: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == NAME:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(peers.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(peers, "RESOLVE_INTERVAL_S", 0.2)
    return answer


def test_nodes_find_each_other_through_one_name(dns):
    port = free_port()
    started: list[CacheNode] = []

    def start(i: int) -> CacheNode:
        ip = f"127.0.0.{i + 1}"
        settings = NodeSettings(
            host=ip, port=port, http_port=0, data_port=0, memory=64 << 20,
            node_id=f"pod-{i}", peers=NAME, advertise_host=ip,
        )  # fmt: skip
        node = CacheNode(settings)
        node.start()
        started.append(node)
        dns.append(ip)  # ready: the Service lists it
        return node

    try:
        for i in range(2):
            start(i)
        wait_until(lambda: all(n.peers.view == {"pod-0", "pod-1"} for n in started), what="two members")
        data = values("dns", 200)
        with Client(f"grpc://127.0.0.1:{port}", refresh_interval=0.3) as client:
            client.put_many(data)
            start(2)  # the name now resolves to a third address; nobody was told its URL
            wait_until(
                lambda: all(n.peers.view == {"pod-0", "pod-1", "pod-2"} for n in started), what="three"
            )
            wait_until(
                lambda: len([m for m in client.members() if m["state"] == "ready"]) == 3, what="client"
            )
            members = {m["node_id"]: m["url"] for m in client.members()}
            assert members == {f"pod-{i}": f"grpc://127.0.0.{i + 1}:{port}" for i in range(3)}
            assert client.get_many(list(data)) == data
            # every node found its own address in the answer and left it alone
            assert all(n.node_id not in n.peers.peers() for n in started)
    finally:
        for node in started:
            node.stop(handoff=False)
