"""The data channel's control ops (prefix hits, leases, contains): the same answers as the gRPC
calls, pipelined replies in order, bad frames refused, the same auth, gRPC for nodes without them.

In-process CacheNodes on loopback with real sockets; which transport answered is read from the
node's request counters, so a silent fallback to gRPC fails the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode import InvalidRequest, Unauthenticated
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.control_ops import control_request
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.server.node import CacheNode

from ..needs import needs

MAX_BATCH_KEYS = 64
VALUE = 4096


def _requests(op: str, transport: str) -> float:
    labels = {"op": op, "transport": transport}
    return REGISTRY.get_sample_value("kvpool_node_requests_total", labels) or 0.0


def _start(**overrides) -> CacheNode:
    values = {"host": "127.0.0.1", "port": 0, "http_port": 0, "data_port": 0, "memory": 1 << 20,
              "max_batch_keys": MAX_BATCH_KEYS, "handoff_deadline": 0, "nixl": "off"}  # fmt: skip
    settings = NodeSettings(**(values | overrides))
    node = CacheNode(settings)
    node.start()
    return node


@pytest.fixture
def node() -> Iterator[CacheNode]:
    n = _start()
    yield n
    n.stop(handoff=False)


def _conn(node: CacheNode, **options) -> NodeConnection:
    tls = options.pop("tls", False)
    return NodeConnection("127.0.0.1", node.port, ConnectOptions.build(tls=tls, timeout=5, **options))


def _fill(conn: NodeConnection, prefix: str, n: int) -> list[bytes]:
    keys = [f"{prefix}-{i:04d}".encode() for i in range(n)]
    conn.put_many([(k, bytes([i % 251]) * VALUE) for i, k in enumerate(keys)])
    return keys


def _data_socket(node: CacheNode, token: bytes | None = None) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", node.data_port), timeout=5)
    sock.sendall(dp.encode_hello(node.data_token if token is None else token))
    return sock, sock.makefile("rb")


def _closed(f) -> bool:
    """Whether the node closed the connection: an end of stream, or a reset (a node that closes
    with the client's bytes unread resets the connection instead of ending it cleanly)."""
    try:
        return f.read(1) == b""
    except ConnectionResetError:
        return True


def _read_status(f) -> tuple[int, int, str]:
    status, count = dp.STATUS_STRUCT.unpack(f.read(dp.STATUS_STRUCT.size))
    message = ""
    if status != dp.STATUS_OK:
        (length,) = dp.MSG_LEN.unpack(f.read(dp.MSG_LEN.size))
        message = f.read(length).decode()
    return status, count, message


def test_data_channel_answers_like_grpc(node):
    data, grpc_only = _conn(node), _conn(node, use_data_channel=False)
    keys = _fill(data, "same", 20)
    probes = [keys, [*keys[:5], b"absent", *keys[5:]], [b"absent", *keys], [], keys[::2]]
    before = {t: _requests("prefix_hits", t) for t in ("data", "grpc")}
    for probe in probes:
        assert data.prefix_hits(probe) == grpc_only.prefix_hits(probe) == node.store.prefix_hits(probe)
        assert data.contains(probe) == grpc_only.contains(probe) == [node.store.contains(k) for k in probe]
    assert _requests("prefix_hits", "data") - before["data"] == len(probes)
    assert _requests("prefix_hits", "grpc") - before["grpc"] == len(probes)

    count, lease = data.lease_prefix([*keys[:4], b"absent"], 60_000)
    g_count, g_lease = grpc_only.lease_prefix([*keys[:4], b"absent"], 60_000)
    assert count == g_count == 4 and lease and g_lease and lease != g_lease
    assert data.lease_prefix([b"absent"], 60_000) == grpc_only.lease_prefix([b"absent"], 60_000) == (0, 0)
    joined = data.lease_prefix(keys[4:6], 60_000, lease)
    assert joined == (2, lease)  # an id the client names is joined
    assert data.release(lease, [keys[0], b"absent"]) == 1
    assert grpc_only.release(g_lease, [keys[0]]) == 1
    assert (data.release(lease), grpc_only.release(g_lease)) == (4 + 2 - 1, 4 - 1)
    assert data.release(lease) == 0  # gone
    assert node.store.stats()["leases"] == 0
    for c in (data, grpc_only):
        c.close()


def test_a_lease_over_the_data_channel_keeps_keys_from_eviction_until_released(node):
    conn = _conn(node)
    keys = _fill(conn, "pinned", 8)
    before = _requests("release", "data")
    count, lease = conn.lease_prefix(keys[:3], 60_000)
    assert count == 3 and lease
    _fill(conn, "pressure", 600)  # 2.4 MiB into 1 MiB of L1: plain LRU would drop the first keys
    assert conn.contains(keys) == [True] * 3 + [False] * 5
    assert conn.release(lease) == 3
    assert _requests("release", "data") == before + 1
    _fill(conn, "more", 600)
    assert conn.contains(keys[:3]) == [False] * 3  # released: ordinary LRU again
    conn.close()


def test_pipelined_requests_are_answered_in_order(node):
    conn = _conn(node)
    keys = _fill(conn, "pipe", 10)
    sock, f = _data_socket(node)
    assert _read_status(f) == (dp.STATUS_OK, dp.FEATURES, "")
    sock.sendall(
        dp.encode_prefix_hits(keys)
        + dp.encode_contains([keys[0], b"absent", keys[9]])
        + dp.encode_lease([*keys[:2], b"absent"], 30_000, 77)
        + dp.encode_prefix_hits([b"absent"])
        + dp.encode_release(77, [])
        + dp.encode_ping()
    )
    assert _read_status(f) == (dp.STATUS_OK, 10, "")
    assert _read_status(f) == (dp.STATUS_OK, 3, "") and f.read(3) == b"\x01\x00\x01"
    assert _read_status(f) == (dp.STATUS_OK, 2, "") and dp.LEASE_ID.unpack(f.read(8)) == (77,)
    assert _read_status(f) == (dp.STATUS_OK, 0, "")
    assert _read_status(f) == (dp.STATUS_OK, 2, "")  # released both pins
    assert _read_status(f) == (dp.STATUS_OK, 0, "")  # the ping, last
    sock.close()
    f.close()

    # The client's pipeline: many more requests than one window of replies, one connection.
    batches = [[keys[i % 10], f"miss-{i}".encode()] * (MAX_BATCH_KEYS // 2) for i in range(300)]
    requests = [control_request(dp.OP_CONTAINS, b, conn.url) for b in batches]
    requests += [control_request(dp.OP_PREFIX_HITS, keys[: i % 11], conn.url) for i in range(300)]
    replies = conn._data.pipeline(requests)
    assert replies[:300] == [[True, False] * (MAX_BATCH_KEYS // 2)] * 300
    assert replies[300:] == [i % 11 for i in range(300)]
    conn.close()


BAD_FRAMES = {
    "too-many-keys": (
        dp.REQUEST_STRUCT.pack(dp.OP_CONTAINS, 0, MAX_BATCH_KEYS + 1, 0),
        "the limit is 64",
    ),
    "huge-count": (dp.REQUEST_STRUCT.pack(dp.OP_PREFIX_HITS, 0, 0xFFFFFFFF, 0), "the limit is 64"),
    "huge-table": (dp.REQUEST_STRUCT.pack(dp.OP_LEASE, 0, 1, 0xFFFFFFFF), "too long for 1 keys"),
    "empty-key": (dp.REQUEST_STRUCT.pack(dp.OP_CONTAINS, 0, 1, 1) + b"\x00", "1..64 bytes"),
    "key-65": (dp.REQUEST_STRUCT.pack(dp.OP_PREFIX_HITS, 0, 2, 66) + b"\x41" + b"k" * 65, "1..64 bytes"),
    "key-65-past-bound": (dp.REQUEST_STRUCT.pack(dp.OP_CONTAINS, 0, 1, 66), "too long for 1 keys"),
    "key-past-table": (dp.REQUEST_STRUCT.pack(dp.OP_CONTAINS, 0, 1, 3) + b"\x09ab", "truncated"),
    "trailing": (dp.REQUEST_STRUCT.pack(dp.OP_CONTAINS, 0, 1, 4) + b"\x01abc", "trailing"),
    "lease-args-short": (dp.REQUEST_STRUCT.pack(dp.OP_LEASE, 0, 0, 4) + b"\x00" * 4, "arguments"),
    "release-args-short": (dp.REQUEST_STRUCT.pack(dp.OP_RELEASE, 0, 0, 0), "arguments"),
    "lease-too-long": (dp.encode_lease([b"k"], 3_600_000, 0), "exceeds the limit"),
    "flags": (dp.REQUEST_STRUCT.pack(dp.OP_CONTAINS, 1, 0, 0), "unknown flags"),
    "unknown-op": (dp.REQUEST_STRUCT.pack(99, 0, 0, 0), "unknown op 99"),
}


@pytest.mark.parametrize("frame, message", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_bad_control_frames_get_a_clear_error_and_the_connection_closes(node, frame, message):
    conn = _conn(node)
    keys = _fill(conn, "bad", 3)
    sock, f = _data_socket(node)
    assert _read_status(f)[0] == dp.STATUS_OK
    sock.sendall(frame)
    status, _, text = _read_status(f)
    assert status == dp.STATUS_INVALID and message in text
    assert _closed(f)
    sock.close()
    f.close()
    assert conn.prefix_hits(keys) == 3  # the node serves on
    assert conn.contains([*keys, b"absent"]) == [True, True, True, False]


def test_the_client_refuses_bad_input_before_it_costs_a_connection(node):
    conn = _conn(node)
    keys = _fill(conn, "client-bad", 2)
    with pytest.raises(InvalidRequest, match="the limit is 64"):
        conn.contains([b"k"] * (MAX_BATCH_KEYS + 1))
    with pytest.raises(InvalidRequest, match=r"1\.\.64 bytes"):
        conn.prefix_hits([b"k" * 65])
    with pytest.raises(InvalidRequest, match="exceeds the limit"):  # the node's answer, as over gRPC
        conn.lease_prefix(keys, 3_600_000)
    with pytest.raises(InvalidRequest, match="out of range"):
        conn.lease_prefix(keys, 1 << 32)
    assert conn.prefix_hits(keys) == 2
    conn.close()


def test_auth_token_guards_the_control_ops():
    node = _start(auth_token="s3cret")
    try:
        with pytest.raises(Unauthenticated):
            _conn(node).prefix_hits([b"k"])  # the Hello that hands out the session token
        sock, f = _data_socket(node, token=b"x" * 32)
        assert _read_status(f)[0] == dp.STATUS_UNAUTHENTICATED  # the hello is refused...
        # ...and the connection closed: an op sent now is never answered.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(dp.encode_prefix_hits([b"k"]))
        assert _closed(f)
        sock.close()
        f.close()
        conn = _conn(node, token="s3cret")
        keys = _fill(conn, "auth", 3)
        before = _requests("prefix_hits", "data")
        assert conn.prefix_hits(keys) == 3
        assert _requests("prefix_hits", "data") == before + 1
        conn.close()
    finally:
        node.stop(handoff=False)


def test_grpc_answers_without_the_data_channel_or_its_control_ops(node, monkeypatch):
    off = _conn(node, use_data_channel=False)
    keys = _fill(off, "fallback", 3)
    before = _requests("contains", "grpc"), _requests("contains", "data")
    assert off.contains(keys) == [True] * 3
    assert (_requests("contains", "grpc"), _requests("contains", "data")) == (before[0] + 1, before[1])

    # A node from before the control ops: its hello reply offers no features.
    monkeypatch.setattr(dp, "FEATURES", 0)
    old = _conn(node)
    before = _requests("prefix_hits", "grpc"), _requests("prefix_hits", "data")
    assert old.prefix_hits(keys) == 3
    assert old.get_many(keys[:1]) == {keys[0]: bytes([0]) * VALUE}  # values still on the data channel
    assert (_requests("prefix_hits", "grpc"), _requests("prefix_hits", "data")) == (before[0] + 1, before[1])
    old.close()

    # Replaced by an old node after the client learned of the ops: its fresh connection says so.
    monkeypatch.setattr(dp, "FEATURES", dp.FEATURE_CONTROL)
    conn = _conn(node)
    assert conn.contains(keys) == [True] * 3  # learned: control ops on
    conn._data.drop_idle()
    monkeypatch.setattr(dp, "FEATURES", 0)
    before = _requests("contains", "grpc")
    assert conn.contains(keys) == [True] * 3
    assert _requests("contains", "grpc") == before + 1
    conn.close()
    off.close()


def test_the_node_refuses_control_ops_it_was_not_offered(node):
    """An old node refuses an unknown op with STATUS_INVALID: the client never sends one there
    (see the negotiation test above); a raw peer that does gets the usual error."""
    sock, f = _data_socket(node)
    _read_status(f)
    sock.sendall(struct.pack("<BBII", 8, 0, 0, 0))
    assert _read_status(f)[:2] == (dp.STATUS_INVALID, 0)
    sock.close()
    f.close()


@needs(shutil.which("openssl") is not None, "needs the openssl command (apt-get install openssl)")
def test_control_ops_over_tls(certs, monkeypatch):
    from kvpool.cachenode.rpc.tls import load_server_tls

    node = _start(tls=load_server_tls(certs / "node.crt", certs / "node.key"), advertise_host="127.0.0.1")
    monkeypatch.setenv("KVPOOL_TLS_CA_FILE", str(certs / "ca.crt"))
    try:
        conn = _conn(node, tls=True)
        keys = _fill(conn, "tls", 3)
        before = _requests("contains", "data")
        assert conn.contains([*keys, b"absent"]) == [True, True, True, False]
        count, lease = conn.lease_prefix(keys, 10_000)
        assert count == 3 and conn.release(lease) == 3
        assert _requests("contains", "data") == before + 1
        conn.close()
    finally:
        node.stop(handoff=False)


def test_values_and_control_ops_share_pooled_connections(node):
    conn = _conn(node)
    keys = _fill(conn, "shared", 4)
    for _ in range(50):
        assert conn.prefix_hits(keys) == 4
        assert conn.get_many(keys[:1]) == {keys[0]: bytes([0]) * VALUE}
    assert len(conn._data._idle) <= conn.options.data_connections
    value = os.urandom(100)
    conn.put_many([(b"after", value)])
    assert conn.contains([b"after"]) == [True]
    conn.close()


def test_the_pool_client_takes_the_control_ops(node):
    from kvpool.cachenode import Client

    with Client(f"grpc://127.0.0.1:{node.port}", timeout=5) as client:
        keys = [f"pool-{i}".encode() for i in range(5)]
        client.put_many({k: b"v" * 100 for k in keys})
        ops = ("prefix_hits", "contains", "release")
        before = {op: (_requests(op, "data"), _requests(op, "grpc")) for op in ops}
        assert client.prefix_hits([*keys, b"absent"]) == 5
        assert client.contains([b"absent", keys[0]]) == [False, True]
        count, lease = client.lease_prefix(keys, 10_000)
        assert count == 5 and lease and all(node.store.leases.is_pinned(k) for k in keys)
        assert client.release(lease) == 5
        assert not any(node.store.leases.is_pinned(k) for k in keys)
        after = {op: (_requests(op, "data"), _requests(op, "grpc")) for op in ops}
        assert {op: (after[op][0] - before[op][0], after[op][1] - before[op][1]) for op in ops} == {
            "prefix_hits": (2, 0),
            "contains": (1, 0),
            "release": (1, 0),
        }


def test_a_pool_client_has_its_requests_to_every_node_in_flight_at_once():
    """Three nodes: the client sends each node's share before it reads any answer; a node that
    stops is routed around, and the answers stay those of the nodes' stores."""
    from kvpool.cachenode import Client
    from kvpool.cachenode.core.placement import Placement
    from kvpool.cli.devtools.local_servers import free_port

    from ..pool.conftest import wait_until

    ports = [free_port() for _ in range(3)]
    nodes = []
    try:
        for i, port in enumerate(ports):
            peers = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
            nodes.append(_start(port=port, node_id=f"f{i}", peers=peers, memory=4 << 20))
        names = {"f0", "f1", "f2"}
        wait_until(lambda: all(n.peers.view == names for n in nodes), what="three members")
        url = ",".join(f"grpc://127.0.0.1:{p}" for p in ports)
        with Client(url, timeout=5, refresh_interval=60) as client:
            keys = [f"fan-{i:03d}".encode() for i in range(60)]
            client.put_many({k: b"v" * 64 for k in keys})
            owners = Placement(sorted(names))
            assert {owners.owner(k) for k in keys} == names  # every node has a share
            before = _requests("prefix_hits", "data")

            def no_worker_threads():
                raise AssertionError("a lookup took a worker thread")

            client._fanout._pool = no_worker_threads  # lookups: every node's request from this thread
            assert client.prefix_hits([*keys, b"absent"]) == 60
            assert client.prefix_hits([*keys[:30], b"absent", *keys[30:]]) == 30
            assert _requests("prefix_hits", "data") - before >= 3 + 3
            count, lease = client.lease_prefix(keys, 10_000)
            assert count == 60 and lease
            assert all(any(n.store.leases.is_pinned(k) for n in nodes) for k in keys)
            assert client.release(lease) == 60
            assert not any(n.store.leases.is_pinned(k) for n in nodes for k in keys)
            assert client.contains([b"absent", *keys[:10]]) == [False] + [True] * 10
            gone = nodes.pop(1)
            gone.stop(handoff=False)
            theirs = [k for k in keys if owners.owner(k) == "f1"]
            ours = [k for k in keys if owners.owner(k) != "f1"]
            assert client.contains(ours) == [True] * len(ours)  # f1's failure is f1's alone
            assert client.contains(theirs) == [False] * len(theirs)
            assert client.prefix_hits(ours) == len(ours)
            for member in client._membership.routing(require_writable=False).members.values():
                assert len(member.conn._data._idle) <= member.conn.options.data_connections
    finally:
        for node in nodes:
            node.stop(handoff=False)
