"""Bad input, one case at a time, against a real node: each gets a clear error, the node keeps
running, and what it stored stays byte-identical."""

from __future__ import annotations

import os
import socket
import struct
import urllib.request

import grpc
import pytest

from kvpool.cachenode import InvalidRequest, Unauthenticated
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc

SENTINELS = {b"sentinel-small": os.urandom(1000), b"sentinel-big": os.urandom(6 * 1024 * 1024)}


@pytest.fixture(autouse=True)
def sentinels_survive(node):
    with node.client() as client:
        client.put_many(SENTINELS)
    yield
    assert node.alive, "the node died"
    with node.client() as client:
        assert client.get_many(list(SENTINELS)) == SENTINELS


def _stub(node) -> tuple[grpc.Channel, pb_grpc.CacheNodeStub]:
    channel = grpc.insecure_channel(node.url.removeprefix("grpc://"))
    return channel, pb_grpc.CacheNodeStub(channel)


def _data_socket(node) -> socket.socket:
    hello = node.hello()
    sock = socket.create_connection(("127.0.0.1", hello.data_port), timeout=5)
    sock.sendall(dp.encode_hello(hello.data_token))
    assert sock.recv(dp.STATUS_STRUCT.size) == dp.encode_status(dp.STATUS_OK, dp.FEATURES)
    return sock


def _read_error(sock: socket.socket) -> tuple[int, str]:
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:  # closed with our bytes unread: a reset ends it too
            break
        if not chunk:
            break
        data += chunk
    status, _ = dp.STATUS_STRUCT.unpack_from(data)
    (length,) = dp.MSG_LEN.unpack_from(data, dp.STATUS_STRUCT.size)
    start = dp.STATUS_STRUCT.size + dp.MSG_LEN.size
    return status, data[start : start + length].decode()


@pytest.mark.parametrize("key", [b"", b"k" * 65], ids=["empty", "65-bytes"])
def test_bad_keys_are_refused_by_client_and_server(node, key):
    with node.client() as client, pytest.raises(InvalidRequest, match=r"1\.\.64 bytes"):
        client.put(key, b"v")
    with node.client() as client, pytest.raises(InvalidRequest, match=r"1\.\.64 bytes"):
        client.get(key)
    channel, stub = _stub(node)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.PrefixHits(pb.KeysRequest(keys=[b"ok", key]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1..64 bytes" in info.value.details()


def test_value_over_max_value_size(node):
    too_big = bytes(16 * 1024 * 1024 + 1)  # the node runs with --max-value-size 16MiB
    with node.client() as client, pytest.raises(InvalidRequest, match="max-value-size"):
        client.put(b"too-big", too_big)
    sock = _data_socket(node)  # the server checks too, before reading any payload
    sock.sendall(dp.encode_put([(b"too-big", len(too_big))]))
    status, message = _read_error(sock)
    assert status == dp.STATUS_INVALID and "max-value-size" in message


def test_batch_with_too_many_keys(node):
    channel, stub = _stub(node)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.PrefixHits(pb.KeysRequest(keys=[b"k%d" % i for i in range(65)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limit is 64" in info.value.details()
    sock = _data_socket(node)
    sock.sendall(dp.encode_get([b"k%d" % i for i in range(65)]))
    status, message = _read_error(sock)
    assert status == dp.STATUS_INVALID and "limit is 64" in message


def test_data_channel_put_cut_off_stores_nothing(node):
    sock = _data_socket(node)
    sock.sendall(dp.encode_put([(b"cut-a", 1000), (b"cut-b", 1024 * 1024)]))
    sock.sendall(os.urandom(1000) + os.urandom(500_000))  # the first value whole, the second half
    sock.close()
    with node.client() as client:
        assert client.get_many([b"cut-a", b"cut-b"]) == {}


def test_grpc_put_stream_cut_off_stores_nothing(node):
    def frames():
        yield pb.PutFrame(
            entries=[pb.PutEntry(key=b"grpc-cut", size=2 * 1024 * 1024)], data=b"x" * 1024 * 1024
        )
        raise RuntimeError("client gave up mid-stream")

    channel, stub = _stub(node)
    with channel, pytest.raises(grpc.RpcError):
        stub.Put(frames(), timeout=5)
    with node.client() as client:
        assert client.get(b"grpc-cut") is None


def test_grpc_put_with_fewer_or_more_bytes_than_announced(node):
    channel, stub = _stub(node)
    with channel:
        for data in (b"x" * 10, b"x" * 30):
            with pytest.raises(grpc.RpcError) as info:
                stub.Put(
                    iter([pb.PutFrame(entries=[pb.PutEntry(key=b"short", size=20)], data=data)]), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "announced" in info.value.details()
    with node.client() as client:
        assert client.get(b"short") is None


def test_grpc_frame_over_4mib_is_refused(node):
    channel, stub = _stub(node)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.Put(
            iter([pb.PutFrame(entries=[pb.PutEntry(key=b"huge", size=5 << 20)], data=bytes(5 << 20))]),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with node.client() as client:
        assert client.get(b"huge") is None


@pytest.mark.parametrize("port_kind", ["grpc", "data", "http"])
def test_garbage_bytes_on_every_port(node, port_kind):
    hello = node.hello()
    port = {"grpc": int(node.url.rsplit(":", 1)[1]), "data": hello.data_port, "http": node.http_port}[
        port_kind
    ]
    for garbage in (os.urandom(64), os.urandom(300_000), b"\x00" * 9, b"GET / HTTP/1.1\r\n" * 3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # the server hung up on the garbage: that is the right answer


def test_data_channel_bad_hello_and_token(node):
    hello = node.hello()
    with socket.create_connection(("127.0.0.1", hello.data_port), timeout=5) as sock:
        sock.sendall(dp.encode_hello(b"wrong-token"))
        status, message = _read_error(sock)
        assert status == dp.STATUS_UNAUTHENTICATED and "token" in message
    with socket.create_connection(("127.0.0.1", hello.data_port), timeout=5) as sock:
        sock.sendall(b"HTTP" + bytes(3))
        status, message = _read_error(sock)
        assert status == dp.STATUS_INVALID and "not a kvpool data channel" in message


@pytest.mark.parametrize(
    "header, expected",
    [
        (dp.REQUEST_STRUCT.pack(99, 0, 1, 2), "unknown op"),  # 4..9 are control ops
        (dp.REQUEST_STRUCT.pack(dp.OP_GET, 7, 1, 2), "unknown flags"),
        (dp.REQUEST_STRUCT.pack(dp.OP_GET, 0, 1, 1 << 30), "too long"),
        (dp.REQUEST_STRUCT.pack(dp.OP_GET, 0, 2, 4) + b"\x01a\x05b", "truncated"),
        (dp.REQUEST_STRUCT.pack(dp.OP_GET, 0, 1, 3) + b"\x00ab", "1..64 bytes"),
        (dp.REQUEST_STRUCT.pack(dp.OP_GET, 0, 1, 3) + b"\x01ab", "trailing"),
        (
            dp.REQUEST_STRUCT.pack(dp.OP_PUT, 0, 1, 10) + struct.pack("<BQ", 1, 1 << 62) + b"k",
            "max-value-size",
        ),
    ],
    ids=["op", "flags", "table-too-long", "truncated-table", "empty-key", "trailing", "absurd-size"],
)
def test_malformed_data_requests(node, header, expected):
    sock = _data_socket(node)
    sock.sendall(header)
    status, message = _read_error(sock)
    assert status == dp.STATUS_INVALID
    assert expected in message


def test_truncated_request_header_then_disconnect(node):
    sock = _data_socket(node)
    sock.sendall(dp.encode_get([b"sentinel-small"])[:5])
    sock.close()


def test_http_garbage_paths(node):
    for path in ("/%00", "/metrics/../../etc/passwd", "/" + "a" * 5000):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}{path}", timeout=5) as r:
                assert r.status in (200, 404)
        except urllib.error.HTTPError as exc:
            assert exc.code in (400, 404, 414)


def test_auth_token_required_everywhere_but_health(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .conftest import run_node

    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with run_node("--auth-token-file", str(token_file)) as secured:
        with secured.client() as anonymous, pytest.raises(Unauthenticated):
            anonymous.put(b"k", b"v")
        with secured.client(token="wrong") as wrong, pytest.raises(Unauthenticated):
            wrong.stats()
        with secured.client(token="s3cret") as client:
            client.put(b"k", b"v" * 100)
            assert client.get(b"k") == b"v" * 100
        with grpc.insecure_channel(secured.url.removeprefix("grpc://")) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        base = f"http://127.0.0.1:{secured.http_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/metrics", timeout=5)
        assert info.value.code == 401
        request = urllib.request.Request(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(request, timeout=5) as r:
            assert b"kvpool_node_requests_total" in r.read()
