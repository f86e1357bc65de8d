"""A connection that does not say a valid hello in time is cut, so nobody without the token can
hold the data or query channel's bounded connection slots (docs/security.md): 300 idle sockets
(more than the data channel's 256 slots) lock a client out only until their hello's deadline."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.core.settings import LookupSettings, NodeSettings
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.server import listener
from kvpool.cachenode.server.lookup.server import LookupServer
from kvpool.cachenode.server.node import CacheNode

HELLO_S = 1.0  # the deadline in these tests (5 s in a real server): what a cut may take, plus a sweep


@pytest.fixture
def short_hello(monkeypatch) -> None:
    monkeypatch.setattr(listener, "HANDSHAKE_TIMEOUT_S", HELLO_S)


@pytest.fixture
def node(short_hello) -> Iterator[CacheNode]:
    n = CacheNode(
        NodeSettings(
            host="127.0.0.1", port=0, http_port=0, data_port=0, memory=8 << 20, handoff_deadline=0, nixl="off"
        )
    )
    n.start()
    yield n
    n.stop(handoff=False)


def idle_sockets(port: int, count: int, drip: bytes = b"") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if drip:
            s.sendall(drip)
        socks.append(s)
    return socks


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server ended the connection (EOF, a reset or a busy reply then EOF) in time."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_idle_and_dripping_connections_are_cut_and_free_their_slots(node):
    k = b"k" * 32
    with closing(NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=5))) as conn:
        conn.put_many([(k, b"v" * 100)])
    # a few bytes of the hello, never the rest, on half; nothing at all on the other half; more
    # sockets than slots (the ones over the bound get the busy reply and are closed at once)
    socks = idle_sockets(node.data_port, 150) + idle_sockets(
        node.data_port, 150, drip=dp.encode_hello(b"x")[:3]
    )
    try:
        t0 = time.monotonic()
        assert all(closed_by_server(s, HELLO_S + 5) for s in socks)
        assert time.monotonic() - t0 < HELLO_S + 5
        while node._data.connections and time.monotonic() - t0 < HELLO_S + 10:
            time.sleep(0.02)  # each cut connection's thread ends and gives its slot back
        assert node._data.connections == 0
        with closing(NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=5))) as conn:
            assert conn.get_many([k]) == {k: b"v" * 100}  # a client with the token gets in again
    finally:
        for s in socks:
            s.close()


def test_control_without_the_deadline_an_idle_connection_holds_its_slot(monkeypatch, node):
    monkeypatch.setattr(listener, "HANDSHAKE_TIMEOUT_S", 1e9)  # for connections accepted from now
    socks = idle_sockets(node.data_port, 3)
    try:
        assert not any(closed_by_server(s, HELLO_S + 1) for s in socks)
        assert node._data.connections == 3
    finally:
        for s in socks:
            s.close()


def test_a_connection_that_said_hello_stays_however_long_it_is_idle(node):
    k = b"q" * 32
    with closing(NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=5))) as conn:
        conn.put_many([(k, b"w" * 10)])
        time.sleep(HELLO_S * 2.5)  # past the hello's deadline: the pooled data connection is kept
        before = node._data.connections
        assert before >= 1 and conn.get_many([k]) == {k: b"w" * 10}
        assert node._data.connections == before  # the same connection answered, no new one


def test_the_query_channel_cuts_late_hellos_too(short_hello):
    server = LookupServer(
        LookupSettings(host="127.0.0.1", port=0, http_port=0, query_port=0, rebuild_window=0)
    )
    server.start()
    try:
        socks = idle_sockets(server.query_port, 20)
        assert all(closed_by_server(s, HELLO_S + 5) for s in socks)
        for s in socks:
            s.close()
        with LookupClient(f"grpc://127.0.0.1:{server.port}", timeout=5) as client:
            assert client.locate([b"z" * 32]).prefix == 0  # the channel still answers
    finally:
        server.stop()
