"""The lookup service's lean query channel, against a real `kvpool lookup` process: the same
answers as gRPC, pipelining, the client's fallback, and bad frames."""

from __future__ import annotations

import os
import socket
import struct
import threading
from concurrent import futures

import grpc
import pytest

from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.core.errors import InvalidRequest, Unauthenticated
from kvpool.cachenode.rpc import lookupproto as lp
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb

from .conftest import run_lookup
from .test_service import Holder, new_keys, wait_until


@pytest.fixture(scope="module")
def lookup():
    with run_lookup("--rebuild-window", "0", "--max-query-keys", "512") as lk:
        yield lk


@pytest.fixture(scope="module")
def held(lookup):
    """Two holders over 40 keys: a holds 0..29, b holds 0..9 and 20..39."""
    keys = new_keys(40)
    a = Holder(lookup.url, "qc-agent-a", keys[:30])
    b = Holder(lookup.url, "qc-node-b", keys[:10] + keys[20:], kind="node")
    a.flush()
    b.flush()
    yield keys
    a.stop()
    b.stop()


def hello(lookup) -> pb.LookupHelloResponse:
    with LookupClient(lookup.url, transport="grpc") as c:
        return c._stub.Hello(pb.LookupHelloRequest(client="test"), timeout=10)


def raw_connection(lookup, token: bytes | None = None) -> socket.socket:
    """A socket past the handshake (with the service's token unless another is given)."""
    answer = hello(lookup)
    sock = socket.create_connection(("127.0.0.1", answer.query_port), timeout=10)
    sock.sendall(lp.encode_hello(answer.query_token if token is None else token))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the service sends until it closes the connection (a reset, when it closed with
    our bytes unread, ends it too)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_the_query_channel_answers_what_grpc_answers(lookup, held):
    keys = held
    queries = [keys, keys[:5], keys[15:], keys[25:] + keys[:3], new_keys(3) + keys, []]
    with (
        LookupClient(lookup.url, transport="tcp") as tcp,
        LookupClient(lookup.url, transport="grpc") as grpc_,
    ):
        for query in queries:
            assert tcp.locate(query) == grpc_.locate(query)
            for kind in ("", "agent", "node"):
                assert tcp.scores(query, 256, kind) == grpc_.scores(query, 256, kind)
        assert tcp.transport_in_use == "tcp" and grpc_.transport_in_use == "grpc"
        located = tcp.locate(keys)
        assert located.prefix == 40
        assert {m.info.holder_id: (m.run, m.info.kind) for m in located.holders} == {
            "qc-agent-a": (30, "agent"),
            "qc-node-b": (10, "node"),
        }
        many = [keys[i : i + 1 + i % 7] for i in range(40)] * 5
        assert tcp.locate_many(many, window=16) == [grpc_.locate(q) for q in many]
        assert list(tcp.locate_stream(iter(many), window=3)) == tcp.locate_many(many, window=1)


def test_the_default_client_moves_to_the_query_channel(lookup, held):
    with LookupClient(lookup.url) as client:
        first = client.locate(held)  # over gRPC while the channel connects in the background
        wait_until(lambda: client.locate(held) is not None and client.transport_in_use == "tcp")
        assert client.locate(held) == first
        assert client.stats()["query_connections"] >= 1


def test_pipelined_requests_are_answered_in_order(lookup, held):
    sock = raw_connection(lookup)
    assert sock.recv(lp.STATUS_STRUCT.size) == lp.encode_status(lp.STATUS_OK)
    queries = [held[:n] for n in (40, 1, 30, 0, 12, 40)]
    sock.sendall(b"".join(lp.encode_locate(32, b"".join(q)) for q in queries))  # all before reading
    reader = sock.makefile("rb")
    for query in queries:
        head = lp.parse_reply(reader.read(lp.REPLY.size), len(query), 1 << 20)
        located = lp.decode_located(head, reader.read(head.body_len), lp.InfoCache())
        assert located.prefix == len(query)
    sock.close()


BAD_FRAMES = [
    (lp.REQUEST.pack(9, 0, 32, 0, 1, 0), "unknown op"),
    (lp.REQUEST.pack(lp.OP_LOCATE, 0, 65, 0, 1, 0), "key_size"),
    (lp.REQUEST.pack(lp.OP_LOCATE, 0, 32, 0, 2**32 - 1, 0), "limit is 512"),  # no body follows
    (lp.REQUEST.pack(lp.OP_LOCATE, 0, 32, 0, 513, 0), "limit is 512"),
    (lp.REQUEST.pack(lp.OP_SCORES, 0, 32, 9, 1, 16) + b"k" * 32, "kind code"),
    (lp.REQUEST.pack(lp.OP_SCORES, 0, 32, 1, 1, 0) + b"k" * 32, "tokens_per_key"),
    (lp.REQUEST.pack(lp.OP_LOCATE, 1, 32, 0, 1, 0) + b"k" * 32, "flags"),
]


@pytest.mark.parametrize(("frame", "words"), BAD_FRAMES)
def test_bad_frames_get_a_clear_error_and_the_connection_closes(lookup, held, frame, words):
    sock = raw_connection(lookup)
    good = lp.encode_locate(32, b"".join(held[:4]))
    sock.sendall(good + frame + good)  # the good one after the bad one is never answered
    data = read_all(sock)
    sock.close()
    status_size = lp.STATUS_STRUCT.size
    assert data[:status_size] == lp.encode_status(lp.STATUS_OK)
    first = lp.parse_reply(data[status_size : status_size + lp.REPLY.size], 4, 1 << 20)
    assert first.status == lp.STATUS_OK and first.prefix == 4
    rest = data[status_size + lp.REPLY.size + first.body_len :]
    error = lp.parse_reply(rest[: lp.REPLY.size], 0, 0)
    assert error.status == lp.STATUS_INVALID
    assert words in rest[lp.REPLY.size :].decode()
    assert len(rest) == lp.REPLY.size + error.body_len  # nothing after the error: closed
    with LookupClient(lookup.url, transport="tcp") as client:  # and the service carries on
        assert client.locate(held).prefix == 40
    assert lookup.proc.poll() is None


def test_bad_handshakes_and_cut_off_frames_leave_the_service_serving(lookup, held):
    port = hello(lookup).query_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"KVPD" + struct.pack("<BH", 1, 0))  # the data channel's magic
    data = read_all(sock)
    assert data[:1] == bytes([lp.STATUS_INVALID]) and b"not a kvpool lookup query channel" in data
    sock = raw_connection(lookup, token=b"wrong")
    data = read_all(sock)
    assert data[:1] == bytes([lp.STATUS_UNAUTHENTICATED]) and b"Hello" in data
    sock = raw_connection(lookup)
    sock.sendall(lp.REQUEST.pack(lp.OP_LOCATE, 0, 32, 0, 10, 0) + b"k" * 100)  # 320 announced
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == lp.encode_status(lp.STATUS_OK)  # no answer to half a frame
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.close()  # gone before the hello
    with LookupClient(lookup.url, transport="tcp") as client:
        assert client.locate(held).prefix == 40
        with pytest.raises(InvalidRequest, match="limit is 512"):  # checked before sending
            client.locate(new_keys(513))
        with pytest.raises(InvalidRequest, match="same size"):
            client.locate([b"a" * 32, b"b" * 16])
        with pytest.raises(InvalidRequest, match="tokens_per_key"):
            client.scores(held, 0)
        assert client.locate(held).prefix == 40  # a refused query does not break the client
    assert lookup.proc.poll() is None


def test_a_restarted_service_is_asked_over_grpc_until_the_channel_is_back():
    keys = new_keys(6)
    with run_lookup("--rebuild-window", "0", "--holder-lease", "1.5") as first:
        port, http_port = first.port, first.http_port
        holder = Holder(first.url, "qc-restart", keys)
        holder.flush()
        client = LookupClient(first.url)
        wait_until(lambda: client.locate(keys).prefix == 6 and client.transport_in_use == "tcp")
        first.kill()
    try:
        with run_lookup("--rebuild-window", "0", "--holder-lease", "1.5", port=port, http_port=http_port):
            # the old connection is dead: queries go over gRPC (its channel may still be in its
            # reconnect backoff) until the client has connected the new process's channel; the
            # holder resyncs at its next heartbeat
            wait_until(lambda: getattr(_try(client.locate, keys), "prefix", 0) == 6)
            wait_until(lambda: _try(client.locate, keys) and client.transport_in_use == "tcp")
            assert client.locate(keys).prefix == 6
    finally:
        holder.stop()
        client.close()


def test_a_service_without_a_query_channel_is_asked_over_grpc():
    """An older lookup service: Hello is unimplemented, Locate answers over gRPC."""
    answer = pb.LookupLocateResponse(prefix=2, authoritative=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    locate = grpc.unary_unary_rpc_method_handler(lambda request, context: answer.SerializeToString())
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("kvpool.v1.Lookup", {"Locate": locate}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with LookupClient(f"grpc://127.0.0.1:{port}") as client:
            for _ in range(5):
                assert client.locate(new_keys(2)).prefix == 2
                threading.Event().wait(0.05)
            assert client.transport_in_use == "grpc"
    finally:
        server.stop(0)


def test_the_channel_needs_the_bearer_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    keys = new_keys(3)
    with run_lookup("--auth-token-file", str(token_file), "--rebuild-window", "0") as lookup:
        holder = Holder(lookup.url, "qc-auth", keys, token="s3cret")
        try:
            holder.flush()
            with LookupClient(lookup.url, transport="tcp") as anonymous, pytest.raises(Unauthenticated):
                anonymous.locate(keys)  # no token, no Hello, no channel
            with LookupClient(lookup.url, token="s3cret", transport="tcp") as client:
                assert client.locate(keys).prefix == 3
                assert client.transport_in_use == "tcp"
        finally:
            holder.stop()


def _try(call, *args):
    try:
        return call(*args)
    except Exception:
        return None


def test_a_kept_connection_the_service_dropped_is_replaced_once():
    """In-process: the service closes idle connections (or restarts on the same port); the next
    call on a kept one notices and asks once more on a fresh connection."""
    from kvpool.cachenode.client.lookup_channel import QueryChannel as ClientChannel
    from kvpool.cachenode.client.lookup_channel import QueryConnection
    from kvpool.cachenode.core.fingerprint import fingerprints
    from kvpool.cachenode.core.holders import HolderInfo
    from kvpool.cachenode.server.lookup.index import LookupIndex
    from kvpool.cachenode.server.lookup.querychannel import QueryChannel
    from kvpool.cachenode.server.lookup.service import check_scores_request

    keys = new_keys(5)
    index = LookupIndex(60, 0)
    index.resync(HolderInfo("in-process", "node", "memory", ""), 1, 1, fingerprints(b"".join(keys), 32))

    def serve(port: int) -> QueryChannel:
        server = QueryChannel(
            index, "127.0.0.1", port, token=b"t", max_query_keys=64, check_scores=check_scores_request
        )
        server.start()
        return server

    server = serve(0)
    port = server.port
    client = ClientChannel(lambda: QueryConnection("127.0.0.1", port, b"t", 5.0))
    frame = lp.encode_locate(32, b"".join(keys))

    def decode(head, body):
        return lp.decode_located(head, body, lp.InfoCache())

    try:
        assert client.call(frame, 5, decode).prefix == 5
        server.stop()  # drops the kept connection
        server = serve(port)
        assert client.call(frame, 5, decode).prefix == 5
        server.stop()
        from kvpool.cachenode.client.lookup_channel import ChannelDown

        with pytest.raises(ChannelDown):  # nobody there: the fresh connection fails too
            client.call(frame, 5, decode)
    finally:
        server.stop()
        client.close()


def test_queries_larger_than_the_read_buffer_and_long_bursts():
    """A query of 1.3 MB (past the server's 256 KiB read buffer) and pipelined bursts that end
    mid-frame: every answer complete and in order."""
    from kvpool.cachenode.client.lookup_channel import QueryChannel as ClientChannel
    from kvpool.cachenode.client.lookup_channel import QueryConnection
    from kvpool.cachenode.core.fingerprint import fingerprints
    from kvpool.cachenode.core.holders import HolderInfo
    from kvpool.cachenode.server.lookup.index import LookupIndex
    from kvpool.cachenode.server.lookup.querychannel import QueryChannel

    big = [os.urandom(64) for _ in range(20000)]
    index = LookupIndex(60, 0)
    index.resync(HolderInfo("big", "node", "memory", ""), 1, 1, fingerprints(b"".join(big[:15000]), 64))
    server = QueryChannel(
        index, "127.0.0.1", 0, token=b"t", max_query_keys=20000, check_scores=lambda t, k: None
    )
    server.start()
    client = ClientChannel(lambda: QueryConnection("127.0.0.1", server.port, b"t", 10.0))

    def decode(head, body):
        return lp.decode_located(head, body, lp.InfoCache())

    try:
        assert client.call(lp.encode_locate(64, b"".join(big)), 20000, decode).prefix == 15000
        cuts = [14600 + (i * 37) % 400 for i in range(300)]  # prefixes from 300 down to 1
        frames = [(lp.encode_locate(64, b"".join(big[c : c + 300])), 300) for c in cuts]
        answers = [r.prefix for r in client.pipeline(frames, decode, window=64)]
        assert answers == [min(300, 15000 - c) for c in cuts]
        assert client.call(lp.encode_locate(64, b"".join(big[:3])), 3, decode).prefix == 3
    finally:
        client.close()
        server.stop()
