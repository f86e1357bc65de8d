"""An agent's Locate and Unpin on its data channel: the answers of the Agent gRPC service, its
pins and the pool's, refused where they do not belong, gRPC for agents that do not offer them.

Agents (and a cache node for the pool) in this process with real sockets; which transport answered
is read from the request counters ("data" for the data channel, "arena" for the Agent service)."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode import InvalidRequest
from kvpool.cachenode.client.agent import AgentClient
from kvpool.cachenode.core import settings as registry
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.server.agent.server import AgentServer
from kvpool.cachenode.server.node import CacheNode

from .conftest import wait_until


def _requests(op: str, transport: str) -> float:
    return REGISTRY.get_sample_value("kvpool_node_requests_total", {"op": op, "transport": transport}) or 0.0


@pytest.fixture
def arena_dir():
    d = Path(tempfile.mkdtemp(prefix="kvpool-test-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_agent(arena_dir: Path, **values) -> AgentServer:
    settings = registry.agent_settings(
        {"host": "127.0.0.1", "port": 0, "http_port": 0, "data_port": 0, "memory": 8 << 20,
         "arena_dir": arena_dir, "agent_id": "ctl", "nixl": "off", "max_batch_keys": 64, **values},
        hostname="unused",
    )  # fmt: skip
    agent = AgentServer(settings)
    agent.start()
    return agent


def _keys(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i:03d}".encode().ljust(32, b".") for i in range(n)]


def test_locate_and_unpin_answer_as_over_grpc_and_pin_in_the_arena(arena_dir):
    agent = make_agent(arena_dir)
    try:
        with AgentClient(agent.url) as data, AgentClient(agent.url, use_data_channel=False) as grpc_only:
            keys = _keys("a", 6)
            assert data.put_many({k: bytes([i]) * 1000 for i, k in enumerate(keys)}) == 6
            probe = [*keys[:4], b"absent".ljust(32, b"."), *keys[4:]]
            before = _requests("prefix_hits", "data"), _requests("prefix_hits", "arena")
            assert data.prefix_hits(probe) == grpc_only.prefix_hits(probe) == 4
            count, lease = data.lease_prefix(keys, 30_000)
            g_count, g_lease = grpc_only.lease_prefix(keys, 30_000)
            assert count == g_count == 6 and lease and g_lease and lease != g_lease
            after = _requests("prefix_hits", "data"), _requests("prefix_hits", "arena")
            assert (after[0] - before[0], after[1] - before[1]) == (2, 2)
            assert all(agent.store.leases.is_pinned(k) for k in keys)
            assert data.release(lease, keys[:2]) == 2 and grpc_only.release(g_lease, keys[:2]) == 2
            assert data.release(lease) == grpc_only.release(g_lease) == 4
            assert not any(agent.store.leases.is_pinned(k) for k in keys)
            assert data.lease_prefix([b"absent".ljust(32, b".")], 30_000) == (0, 0)
    finally:
        agent.stop()


def test_locate_counts_and_pins_what_the_pool_holds(arena_dir):
    settings = NodeSettings(host="127.0.0.1", port=0, http_port=0, data_port=0, memory=16 << 20, nixl="off")
    node = CacheNode(settings)
    node.start()
    agent = make_agent(arena_dir, pool_url=node.url)
    try:
        keys = _keys("pool", 4)
        node.store.put_many([(k, b"p" * 500) for k in keys])
        with AgentClient(agent.url) as client:
            count, lease = client.lease_prefix(keys, 30_000)
            assert count == 4 and lease
            assert all(node.store.leases.is_pinned(k) for k in keys)  # the pool pinned them
            wait_until(lambda: all(agent.store.contains(k) for k in keys), timeout=10, what="prefetched")
            client.release(lease)
            wait_until(
                lambda: not any(node.store.leases.is_pinned(k) for k in keys), timeout=10, what="unpinned"
            )
    finally:
        agent.stop()
        node.stop(handoff=False)


def test_bad_locates_are_refused_and_nodes_refuse_agent_ops(arena_dir):
    agent = make_agent(arena_dir)
    node = CacheNode(
        NodeSettings(host="127.0.0.1", port=0, http_port=0, data_port=0, memory=1 << 20, nixl="off")
    )
    node.start()
    try:
        with AgentClient(agent.url) as client:
            with pytest.raises(InvalidRequest, match="exceeds the limit"):
                client.lease_prefix(_keys("b", 2), 3_600_000)
            with pytest.raises(InvalidRequest, match="the limit is 64"):
                client.lease_prefix(_keys("b", 65), 1000)
            assert client.prefix_hits(_keys("b", 2)) == 0  # and it serves on
        for server, expected in ((agent, dp.STATUS_OK), (node, dp.STATUS_INVALID)):
            with socket.create_connection(("127.0.0.1", server.data_port), timeout=5) as sock:
                f = sock.makefile("rb")
                sock.sendall(dp.encode_hello(server.data_token) + dp.encode_locate([b"k"], 0, 0))
                status, features = dp.STATUS_STRUCT.unpack(f.read(dp.STATUS_STRUCT.size))
                assert status == dp.STATUS_OK
                assert bool(features & dp.FEATURE_AGENT) == (server is agent)
                assert dp.STATUS_STRUCT.unpack(f.read(dp.STATUS_STRUCT.size))[0] == expected
                f.close()
    finally:
        agent.stop()
        node.stop(handoff=False)


def test_an_agent_without_the_ops_is_asked_over_grpc(arena_dir):
    agent = make_agent(arena_dir)
    agent._data.agent = None  # as an agent from before them: its hello reply lacks FEATURE_AGENT
    try:
        with AgentClient(agent.url) as client:
            before = _requests("prefix_hits", "arena"), _requests("prefix_hits", "data")
            assert client.prefix_hits(_keys("c", 2)) == 0
            assert (_requests("prefix_hits", "arena"), _requests("prefix_hits", "data")) == (
                before[0] + 1,
                before[1],
            )
    finally:
        agent.stop()


def test_an_agent_with_auth_takes_the_token_on_the_data_channel_too(arena_dir):
    agent = make_agent(arena_dir, auth_token="s3cret")
    try:
        with AgentClient(agent.url, token="s3cret") as client:
            keys = _keys("d", 3)
            assert client.put_many({k: b"v" * 10 for k in keys}) == 3
            before = _requests("release", "data")
            count, lease = client.lease_prefix(keys, 10_000)
            assert count == 3 and client.release(lease) == 3
            assert _requests("release", "data") == before + 1
    finally:
        agent.stop()
