"""Every reply is checked: a node that answers with counts or sizes that do not fit the request or
its own limits is an error (and its keys go elsewhere), never a short, long or shifted value.

A real node cannot be made to lie, so these are small servers that do: a gRPC servicer and a data
channel on loopback sockets, each answering one kind of wrong reply.
"""

from __future__ import annotations

import socket
import struct
import threading
from concurrent import futures

import grpc
import pytest

from kvpool.cachenode import Client, Unavailable
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.core.errors import BadReply
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc

MAX_VALUE = 1000


class Liar(pb_grpc.CacheNodeServicer):
    def __init__(self, mode: str, data_port: int = 0) -> None:
        self.mode = mode
        self.data_port = data_port

    def Hello(self, request, context):
        return pb.HelloResponse(
            node_id="liar", data_port=self.data_port, data_token=b"token", max_value_size=MAX_VALUE,
            max_batch_keys=64, max_frame_size=4 << 20,
        )  # fmt: skip

    def Get(self, request, context):
        n = len(request.keys)
        if self.mode == "short":  # announces 10 bytes per key, sends 5 in all
            yield pb.GetFrame(sizes=[10] * n, data=b"x" * 5)
        elif self.mode == "long":
            yield pb.GetFrame(sizes=[5] * n, data=b"x" * (5 * n + 3))
        elif self.mode == "count":
            yield pb.GetFrame(sizes=[5] * (n + 1), data=b"x" * (5 * (n + 1)))
        elif self.mode == "over_limit":
            yield pb.GetFrame(sizes=[MAX_VALUE + 1] * n, data=b"x" * ((MAX_VALUE + 1) * n))
        elif self.mode == "negative":
            yield pb.GetFrame(sizes=[-7] * n)
        elif self.mode == "late_sizes":
            yield pb.GetFrame(sizes=[5] * n, data=b"x" * 5)
            yield pb.GetFrame(sizes=[1], data=b"x" * (5 * n - 5))
        elif self.mode == "no_sizes":
            yield pb.GetFrame(data=b"x" * 5)

    def PrefixHits(self, request, context):
        return pb.CountResponse(count=len(request.keys) + 1)

    def Contains(self, request, context):
        return pb.ContainsResponse(present=[True] * (len(request.keys) + 1))

    def Delete(self, request, context):
        return pb.CountResponse(count=len(request.keys) + 2)

    def Put(self, request_iterator, context):
        for _ in request_iterator:
            pass
        return pb.PutResponse(stored=0)

    def Stats(self, request, context):
        return pb.StatsResponse(json="[1, 2, 3]")

    def Members(self, request, context):
        if self.mode == "members_port":
            return pb.MembersResponse(node=pb.Member(node_id="liar", grpc_port=70000, state="ready"))
        if self.mode == "members_state":
            return pb.MembersResponse(node=pb.Member(node_id="liar", grpc_port=1, state="confused"))
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no members here")


@pytest.fixture
def liar():
    servers = []

    def start(mode: str, data_port: int = 0) -> NodeConnection:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_CacheNodeServicer_to_server(Liar(mode, data_port), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0)


def conn_to(port: int) -> NodeConnection:
    return NodeConnection("127.0.0.1", port, ConnectOptions(timeout=5))


@pytest.mark.parametrize(
    "mode, message",
    [
        ("short", "announced"),
        ("long", "more than"),
        ("count", "sizes for"),
        ("over_limit", "outside"),
        ("negative", "outside"),
        ("late_sizes", "later get frame"),
        ("no_sizes", "sizes for"),
    ],
)
def test_grpc_get_replies_that_do_not_add_up(liar, mode, message):
    conn = conn_to(liar(mode))
    with pytest.raises(BadReply, match=message):
        conn.get_many([b"a", b"b"])
    conn.close()


def test_counts_and_flags_beyond_the_request(liar):
    conn = conn_to(liar("count"))
    with pytest.raises(BadReply, match="prefix of 3 hits for 2 keys"):
        conn.prefix_hits([b"a", b"b"])
    with pytest.raises(BadReply, match="3 flags for 2 keys"):
        conn.contains([b"a", b"b"])
    with pytest.raises(BadReply, match="deleted 4 of 2"):
        conn.delete([b"a", b"b"])
    with pytest.raises(BadReply, match="stored 0 of 1"):
        conn.put_many([(b"a", b"v")])
    with pytest.raises(BadReply, match="not a JSON object"):
        conn.stats()
    conn.close()


@pytest.mark.parametrize(
    "mode, message", [("members_port", "grpc_port 70000"), ("members_state", "unknown state")]
)
def test_member_entries_are_checked(liar, mode, message):
    conn = conn_to(liar(mode))
    with pytest.raises(BadReply, match=message):
        conn.members()
    conn.close()


def test_the_client_never_hands_out_a_truncated_value(liar):
    port = liar("short")
    with Client(f"grpc://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(Unavailable):  # its only member lied: nothing left to ask
            client.get(b"a")
        assert client.members()[0]["state"] == "unreachable"  # marked down


class LyingDataChannel:
    """Accepts the hello, then answers every request with `reply(request_keys)` bytes."""

    def __init__(self, reply) -> None:
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rb")
                _, _, token_len = dp.HELLO_STRUCT.unpack(f.read(dp.HELLO_STRUCT.size))
                f.read(token_len)
                conn.sendall(dp.encode_status(dp.STATUS_OK))
                op, _, count, table_len = dp.REQUEST_STRUCT.unpack(f.read(dp.REQUEST_STRUCT.size))
                entries = dp.parse_table(op, count, f.read(table_len))
                if op == dp.OP_PUT:
                    for _, size in entries:
                        f.read(size)
                conn.sendall(self.reply(op, len(entries)))
                f.close()  # the file holds the socket open otherwise

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    "reply, message",
    [
        (lambda op, n: dp.encode_status(dp.STATUS_OK, n + 1) + dp.encode_sizes([1] * (n + 1)), "sizes for"),
        (lambda op, n: dp.encode_status(dp.STATUS_OK, n) + dp.encode_sizes([1 << 40] * n), "outside"),
        (lambda op, n: dp.encode_status(dp.STATUS_OK, n) + struct.pack("<q", -2) * n, "outside"),
    ],
    ids=["count", "huge", "negative"],
)
def test_data_channel_sizes_are_checked_before_reading(liar, reply, message):
    fake = LyingDataChannel(reply)
    conn = conn_to(liar("short", data_port=fake.port))
    with pytest.raises(BadReply, match=message):
        conn.get_many([b"a"])
    conn.close()
    fake.close()


def test_data_channel_cut_short_and_put_counts(liar):
    fake = LyingDataChannel(
        lambda op, n: dp.encode_status(dp.STATUS_OK, n) + dp.encode_sizes([100] * n) + b"x" * 10
    )
    conn = conn_to(liar("short", data_port=fake.port))
    with pytest.raises(Unavailable, match="closed mid-response"):
        conn.get_many([b"a"])
    fake.reply = lambda op, n: dp.encode_status(dp.STATUS_OK, 0)
    with pytest.raises(BadReply, match="stored 0 of 2"):
        conn.put_many([(b"a", b"1"), (b"b", b"2")])
    conn.close()
    fake.close()
