"""Puts on the data channel, against an in-process CacheNode over real loopback sockets.

Many puts in flight (requests split into batches, several threads on pooled connections) are all
stored byte-exact; a put is acknowledged only once its value is in the index; a connection cut
mid-value and a value over --max-value-size store nothing, not even part of a request; values at
the limit are stored whole. And the lookup publisher turns a burst of puts into one Publish call
(one call per put cost a node about 0.25 ms of CPU per put on a 2-core machine).

The data channel carries no checksum of its own (TCP's covers the bytes; NIXL and agent puts,
which write memory directly, commit with xxh3 checksums): what a node stores is what arrived, all
of a request or none of it."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from kvpool.cachenode import InvalidRequest
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.publisher import Publisher
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.server.node import CacheNode
from kvpool.cli.devtools.local_servers import kvpool_lookup

MiB = 1024 * 1024
MAX_VALUE = 1 * MiB
MAX_BATCH_KEYS = 8


def _data_puts() -> float:
    return REGISTRY.get_sample_value("kvpool_node_requests_total", {"op": "put", "transport": "data"}) or 0.0


def _errors(kind: str) -> float:
    return REGISTRY.get_sample_value("kvpool_node_errors_total", {"kind": kind}) or 0.0


def _start(memory: int) -> CacheNode:
    settings = NodeSettings(
        host="127.0.0.1", port=0, http_port=0, data_port=0, memory=memory, max_value_size=MAX_VALUE,
        max_batch_keys=MAX_BATCH_KEYS, handoff_deadline=0, nixl="off",
    )  # fmt: skip
    n = CacheNode(settings)
    n.start()
    return n


@pytest.fixture
def node() -> Iterator[CacheNode]:
    n = _start(64 * MiB)
    yield n
    n.stop(handoff=False)


def _conn(node: CacheNode) -> NodeConnection:
    return NodeConnection("127.0.0.1", node.port, ConnectOptions.build(tls=False, timeout=10))


def _data_socket(node: CacheNode) -> socket.socket:
    hello = _conn(node).hello()
    sock = socket.create_connection(("127.0.0.1", hello.data_port), timeout=10)
    sock.sendall(dp.encode_hello(hello.data_token))
    status, _ = dp.STATUS_STRUCT.unpack(_recv_exact(sock, dp.STATUS_STRUCT.size))
    assert status == dp.STATUS_OK
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_to_close(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("not true in time")
        time.sleep(0.01)


def test_many_puts_in_flight_are_all_stored_byte_exact(node):
    conn = _conn(node)
    values = {f"batch-{i:03d}".encode(): os.urandom(1 + (i * 7919) % (64 * 1024)) for i in range(50)}
    values[b"batch-max"] = os.urandom(MAX_VALUE)
    values[b"batch-empty"] = b""
    before = _data_puts()
    conn.put_many(list(values.items()))  # 52 values: 7 requests of at most 8 keys
    requests = -(-len(values) // MAX_BATCH_KEYS)  # counted just after each acknowledgement
    _wait_until(lambda: _data_puts() - before >= requests)
    assert _data_puts() - before == requests, "not all on the data channel"

    threaded = {
        f"thread-{t}-{i:02d}".encode(): os.urandom(4096 + t * 1000 + i) for t in range(4) for i in range(25)
    }
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for key, value in threaded.items():
                if key.startswith(f"thread-{t}-".encode()):
                    conn.put_many([(key, value)])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    expected = {**values, **threaded}
    got = conn.get_many(list(expected))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value, key


def test_a_put_is_acknowledged_only_once_it_is_in_the_index(node):
    sock = _data_socket(node)
    for i in range(200):
        key = f"acked-{i}".encode()
        sock.sendall(dp.encode_put([(key, 1000)]) + bytes([i % 256]) * 1000)
        status, count = dp.STATUS_STRUCT.unpack(_recv_exact(sock, dp.STATUS_STRUCT.size))
        assert (status, count) == (dp.STATUS_OK, 1)
        assert node.store.contains(key), f"put {i} was acknowledged before it was indexed"
        assert bytes(node.store.get(key)) == bytes([i % 256]) * 1000
    sock.close()


def test_values_that_arrive_in_pieces_are_stored_whole(node):
    """Values split across the header's read-ahead and later socket reads, in odd-sized pieces,
    the next value's first bytes arriving with the end of the one before."""
    values = [os.urandom(n) for n in (3, 300_000, 1, 70_000, MAX_VALUE)]
    keys = [f"piece-{i}".encode() for i in range(len(values))]
    stream = dp.encode_put([(k, len(v)) for k, v in zip(keys, values, strict=True)]) + b"".join(values)
    sock = _data_socket(node)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pos = 0
    for i, step in enumerate((12, 5, 4093, 65_537, 1, 250_000) * 100):
        if pos >= len(stream):
            break
        sock.sendall(stream[pos : pos + step])
        pos += step
        if i % 7 == 0:
            time.sleep(0.002)  # let the node's reads end mid-value
    sock.sendall(stream[pos:])
    assert dp.STATUS_STRUCT.unpack(_recv_exact(sock, dp.STATUS_STRUCT.size)) == (dp.STATUS_OK, len(values))
    sock.close()
    for key, value in zip(keys, values, strict=True):
        assert bytes(node.store.get(key)) == value, key


def test_a_connection_cut_mid_value_stores_nothing(node):
    conn = _conn(node)
    old = os.urandom(100_000)
    conn.put_many([(b"cut-b", old)])
    used = node.store.memory.arena_used
    gone = _errors("data_disconnect")
    sock = _data_socket(node)
    # a whole first value, then half of the second: neither may become visible
    sock.sendall(
        dp.encode_put([(b"cut-a", 1000), (b"cut-b", 200_000)]) + os.urandom(1000) + os.urandom(100_000)
    )
    sock.close()
    _wait_until(lambda: _errors("data_disconnect") > gone)
    assert not node.store.contains(b"cut-a")
    assert bytes(node.store.get(b"cut-b")) == old, "the cut-off put replaced the stored value"
    _wait_until(lambda: node.store.memory.arena_used == used)  # the received ranges went back
    assert conn.get_many([b"cut-a", b"cut-b"]) == {b"cut-b": old}


def test_values_at_and_over_max_value_size(node):
    conn = _conn(node)
    at_limit = os.urandom(MAX_VALUE)
    conn.put_many([(b"limit-at", at_limit)])
    assert conn.get_many([b"limit-at"]) == {b"limit-at": at_limit}

    with pytest.raises(InvalidRequest, match="max-value-size"):  # the client checks before sending
        conn.put_many([(b"limit-ok", b"x"), (b"limit-over", bytes(MAX_VALUE + 1))])
    sock = _data_socket(node)  # and the node, before it reads any of the values
    sock.sendall(dp.encode_put([(b"limit-ok", 1), (b"limit-over", MAX_VALUE + 1)]))
    reply = _read_to_close(sock)
    status, _ = dp.STATUS_STRUCT.unpack_from(reply)
    assert status == dp.STATUS_INVALID and b"max-value-size" in reply
    assert not node.store.contains(b"limit-ok") and not node.store.contains(b"limit-over")
    assert conn.get_many([b"limit-at"]) == {b"limit-at": at_limit}


def test_a_request_over_the_node_limit_is_refused_whole():
    small = _start(4 * MiB)  # a request may carry max(max_value_size, memory) bytes: 4 MiB here
    try:
        sock = _data_socket(small)
        sock.sendall(dp.encode_put([(f"over-{i}".encode(), MAX_VALUE) for i in range(5)]))
        reply = _read_to_close(sock)
        assert dp.STATUS_STRUCT.unpack_from(reply)[0] == dp.STATUS_INVALID and b"exceeds" in reply
        assert not any(small.store.contains(f"over-{i}".encode()) for i in range(5))
        sock = _data_socket(small)  # three fit in one request and in L1, and are stored whole
        sock.sendall(dp.encode_put([(f"fits-{i}".encode(), MAX_VALUE) for i in range(3)]))
        sock.sendall(b"".join(bytes([i]) * MAX_VALUE for i in range(3)))
        assert dp.STATUS_STRUCT.unpack(_recv_exact(sock, dp.STATUS_STRUCT.size)) == (dp.STATUS_OK, 3)
        sock.close()
        for i in range(3):
            assert bytes(small.store.get(f"fits-{i}".encode())) == bytes([i]) * MAX_VALUE
    finally:
        small.stop(handoff=False)


def test_a_burst_of_puts_is_one_publish_call():
    """Events that arrive within the linger go out as one batch; flush() does not wait it out."""
    with kvpool_lookup("--rebuild-window", "0") as lookup:
        keys: list[bytes] = []
        info = HolderInfo("burst-holder", "node", "memory", "grpc://burst-holder:7400")
        publisher = Publisher(lookup.url, info, lambda: list(keys), linger=30.0).start()
        try:
            assert publisher.flush(15)  # the first contact's snapshot
            batches = publisher.counters["batches"]
            started = time.monotonic()
            for i in range(50):
                keys.append(f"burst-{i}".encode())
                publisher.admitted([keys[-1]])
                time.sleep(0.002)
            assert publisher.flush(15), publisher.stats()
            assert time.monotonic() - started < 10, "flush waited out the linger"
            assert publisher.counters["batches"] - batches == 1
            assert publisher.counters["events"] >= 50
        finally:
            publisher.stop()
