"""Garbage and mutated frames through real sockets into real servers: a cache node's data channel
and gRPC Put, a lookup service's query channel and its gRPC Publish/Resync (the holders' events).
Each server drops the connection or answers an error, and then still serves a valid request:
that request, and the unchanged sentinel values read back, are the barrier that proves it
survived (no sleep stands in for it)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.client.publisher import Publisher
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.settings import LookupSettings, NodeSettings
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc import lookupproto as lp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2 as lpb
from kvpool.cachenode.server.lookup.server import LookupServer
from kvpool.cachenode.server.node import CacheNode

from .profiles import socket_examples
from .strategies import frames_or_mutants, mutated
from .test_dataproto import requests as data_requests

MAX_BATCH = 64
SENTINELS = {bytes([0xA0 + i]) * 32: bytes([i]) * (1000 + i) for i in range(4)}
READ_LIMIT_S = 10.0  # far above any answer: reaching it means the server hung


@pytest.fixture(scope="module")
def node() -> Iterator[CacheNode]:
    settings = NodeSettings(
        host="127.0.0.1", port=0, http_port=0, data_port=0, memory=8 << 20, max_value_size=1 << 20,
        max_batch_keys=MAX_BATCH, handoff_deadline=0, nixl="off",
    )  # fmt: skip
    n = CacheNode(settings)
    n.start()
    conn = NodeConnection("127.0.0.1", n.port, ConnectOptions(timeout=10))
    conn.put_many(list(SENTINELS.items()))
    conn.close()
    yield n
    n.stop(handoff=False)


def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload`, end our side, and read until the server closes: a server that neither
    answers nor closes fails the test with a timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_LIMIT_S) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # it closed on us already
        out = b""
        while True:
            try:
                got = sock.recv(65536)
            except ConnectionResetError:  # it closed with our bytes unread
                return out
            if not got:
                return out
            out += got


def node_still_serves(node: CacheNode) -> None:
    conn = NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=10))
    try:
        assert conn.get_many(list(SENTINELS)) == SENTINELS  # stored data untouched
        assert conn.prefix_hits(list(SENTINELS)) == len(SENTINELS)
    finally:
        conn.close()


def check_data_replies(out: bytes) -> None:
    """What the node sent is well framed: statuses (and their payloads), an error last."""
    if len(out) >= dp.STATUS_STRUCT.size:
        status, _ = dp.STATUS_STRUCT.unpack_from(out)
        assert status in (dp.STATUS_OK, dp.STATUS_INVALID, dp.STATUS_UNAUTHENTICATED), out[:16]


@settings(max_examples=socket_examples(100), deadline=None)
@given(frames_or_mutants(st.lists(data_requests(), min_size=1, max_size=3).map(b"".join)))
def test_data_channel_survives_garbage_requests(node, frames):
    out = exchange(node.data_port, dp.encode_hello(node.data_token) + frames)
    status, features = dp.STATUS_STRUCT.unpack_from(out)
    assert status == dp.STATUS_OK and features & dp.FEATURE_CONTROL
    check_data_replies(out[dp.STATUS_STRUCT.size :])
    node_still_serves(node)


@settings(max_examples=socket_examples(100), deadline=None)
@given(frames_or_mutants(st.just(dp.encode_hello(b"t" * 32)).map(lambda h: h + dp.encode_ping())))
def test_data_channel_survives_garbage_hellos(node, frames):
    out = exchange(node.data_port, frames)
    if out:
        status, _ = dp.STATUS_STRUCT.unpack_from(out)
        assert status in (dp.STATUS_INVALID, dp.STATUS_UNAUTHENTICATED)  # never OK: wrong token
    node_still_serves(node)


@settings(max_examples=socket_examples(100), deadline=None)
@given(st.binary(max_size=64), st.integers(0, 1 << 62), st.integers(0, 3))
def test_data_channel_put_sizes_are_bounded(node, key_noise, size, extra):
    """A put announcing any size: over the node's limits it is refused before any allocation."""
    key = (key_noise or b"k")[:64]
    frame = dp.encode_put([(key, size)] * (1 + extra)) + b"v" * min(size, 4096)
    out = exchange(node.data_port, dp.encode_hello(node.data_token) + frame)
    check_data_replies(out[dp.STATUS_STRUCT.size :])
    node_still_serves(node)


@settings(max_examples=socket_examples(100), deadline=None)
@given(
    st.lists(
        st.builds(
            pb.PutFrame,
            entries=st.lists(
                st.builds(pb.PutEntry, key=st.binary(max_size=70), size=st.integers(0, 1 << 62)), max_size=4
            ),
            data=st.binary(max_size=3000),
        ),
        max_size=3,
    )
)
def test_grpc_put_survives_frames_that_do_not_add_up(node, frames):
    channel = grpc.insecure_channel(f"127.0.0.1:{node.port}")
    put = channel.stream_unary(
        "/kvpool.v1.CacheNode/Put", pb.PutFrame.SerializeToString, pb.PutResponse.FromString
    )
    try:
        put(iter(frames), timeout=READ_LIMIT_S)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
    finally:
        channel.close()
    node_still_serves(node)


# -- the lookup service ----------------------------------------------------------------------------
LOOKUP_KEYS = [bytes([0xB0 + i]) * 32 for i in range(5)]


@pytest.fixture(scope="module")
def lookup() -> Iterator[LookupServer]:
    server = LookupServer(
        LookupSettings(
            host="127.0.0.1", port=0, http_port=0, query_port=0, rebuild_window=0, max_query_keys=512
        )
    )
    server.start()
    info = HolderInfo("fuzz-holder", "node", "memory", "grpc://127.0.0.1:1")
    publisher = Publisher(server.url, info, lambda: list(LOOKUP_KEYS)).start()
    assert publisher.flush(15)
    yield server
    publisher.stop()
    server.stop()


def lookup_still_serves(server: LookupServer) -> None:
    with LookupClient(server.url, timeout=10, transport="tcp") as c:
        located = c.locate(LOOKUP_KEYS)
    assert located.prefix == len(LOOKUP_KEYS) and [m.info.holder_id for m in located.holders] == [
        "fuzz-holder"
    ]


def _queries():
    keys = st.integers(1, 64).flatmap(lambda n: st.lists(st.binary(min_size=n, max_size=n), max_size=10))
    return st.one_of(
        keys.map(lambda ks: lp.encode_locate(*lp.pack_query(ks))),
        st.builds(lambda ks, t, k: lp.encode_scores(*lp.pack_query(ks), t, k), keys, st.integers(0, 1 << 20), st.sampled_from(lp.KINDS)),
    )  # fmt: skip


@settings(max_examples=socket_examples(100), deadline=None)
@given(frames_or_mutants(st.lists(_queries(), min_size=1, max_size=3).map(b"".join)))
def test_query_channel_survives_garbage(lookup, frames):
    out = exchange(lookup.query_port, lp.encode_hello(lookup.query_token) + frames)
    status, _ = lp.STATUS_STRUCT.unpack_from(out)
    assert status == lp.STATUS_OK
    pos = lp.STATUS_STRUCT.size
    while len(out) - pos >= lp.REPLY.size:  # replies, each framed as it says, an error last
        head = lp.REPLY.unpack_from(out, pos)
        assert head[0] in (lp.STATUS_OK, lp.STATUS_INVALID), head
        pos += lp.REPLY.size + head[4]
    assert pos == len(out)
    lookup_still_serves(lookup)


@settings(max_examples=socket_examples(100), deadline=None)
@given(frames_or_mutants(st.just(lp.encode_hello(b"t" * 32))))
def test_query_channel_survives_garbage_hellos(lookup, frames):
    out = exchange(lookup.query_port, frames)
    if out:
        status, _ = lp.STATUS_STRUCT.unpack_from(out)
        assert status in (lp.STATUS_INVALID, lp.STATUS_UNAUTHENTICATED)
    lookup_still_serves(lookup)


def _publish_bytes():
    blocks = st.builds(lpb.LookupKeys, key_size=st.integers(0, 80), keys=st.binary(max_size=200))
    request = st.builds(
        lpb.LookupPublishRequest,
        holder_id=st.text(max_size=300),
        incarnation=st.integers(0, (1 << 64) - 1),
        seq=st.integers(0, (1 << 64) - 1),
        admitted=st.lists(blocks, max_size=3),
        evicted=st.lists(blocks, max_size=3),
        oldest_event_age_s=st.floats(allow_nan=True, allow_infinity=True),
        pending=st.integers(0, (1 << 64) - 1),
    )
    return frames_or_mutants(request.map(lambda r: r.SerializeToString()))


OK_OR_REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
)


@settings(max_examples=socket_examples(100), deadline=None)
@given(_publish_bytes())
def test_publish_survives_garbage_events(lookup, payload):
    """Holders' event batches as raw bytes: parsed, checked, applied or refused (INTERNAL is
    gRPC's answer to bytes that are not a protobuf message at all)."""
    channel = grpc.insecure_channel(lookup.url.removeprefix("grpc://"))
    publish = channel.unary_unary("/kvpool.v1.Lookup/Publish", None, lpb.LookupPublishResponse.FromString)
    try:
        publish(payload, timeout=READ_LIMIT_S)
    except grpc.RpcError as exc:
        assert exc.code() in OK_OR_REFUSED, exc
    finally:
        channel.close()
    lookup_still_serves(lookup)


@settings(max_examples=socket_examples(100), deadline=None)
@given(st.lists(_publish_bytes().flatmap(mutated), max_size=3))
def test_resync_survives_garbage_snapshots(lookup, frames):
    channel = grpc.insecure_channel(lookup.url.removeprefix("grpc://"))
    resync = channel.stream_unary("/kvpool.v1.Lookup/Resync", None, lpb.LookupPublishResponse.FromString)
    try:
        resync(iter(frames), timeout=READ_LIMIT_S)
    except grpc.RpcError as exc:
        assert exc.code() in OK_OR_REFUSED, exc
    finally:
        channel.close()
    lookup_still_serves(lookup)
