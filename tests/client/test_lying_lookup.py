"""The lookup client's query channel against a service that lies: a slow drip, a stall, a body
longer or shorter than announced, a prefix beyond the query, a huge announced body, garbage.
The client raises a KVPoolError (with transport="tcp"; "auto" would ask gRPC instead), never
waits past its timeout (plus MARGIN_S), and never allocates what a length field announces before
the bytes arrive."""

from __future__ import annotations

import contextlib
import socket
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.core.errors import KVPoolError
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.located import HolderMatch, Located
from kvpool.cachenode.rpc import lookupproto as lp
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc

from ..fuzz.profiles import socket_examples
from .liar import LyingServer

TIMEOUT_S = 1.0
MARGIN_S = 0.75
TOKEN = b"lookup-liar"
KEYS = [bytes([i]) * 32 for i in range(8)]
TRUTH = Located(3, [HolderMatch(HolderInfo("node-a", "node", "memory", "127.0.0.1:7400"), 3, b"\x07")], True)


class _Hello(pb_grpc.LookupServicer):
    def __init__(self, query_port: int) -> None:
        self.query_port = query_port

    def Hello(self, request, context):
        return pb.LookupHelloResponse(query_port=self.query_port, query_token=TOKEN, max_query_keys=512)


class LyingLookup(LyingServer):
    """A gRPC Hello and a query channel whose replies `answer(sock, request)` writes."""

    def __init__(self, answer) -> None:
        self.answer = answer
        super().__init__(lambda server, port: pb_grpc.add_LookupServicer_to_server(_Hello(port), server), 2)

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            f.read(lp.parse_hello(f.read(lp.HELLO_STRUCT.size)))
            conn.sendall(lp.encode_status(lp.STATUS_OK))
            while True:
                header = f.read(lp.REQUEST.size)
                if len(header) < lp.REQUEST.size:
                    return
                request = lp.parse_request(header, 512)
                f.read(request.body_len)
                if self.answer(conn, request) is False:
                    return
        except (OSError, ValueError):
            return
        finally:
            f.close()
            with contextlib.suppress(OSError):
                conn.close()


def truthful(sock, request) -> None:
    sock.sendall(lp.encode_located(TRUTH, lp.encode_info))


def outcome(fn):
    started = time.monotonic()
    try:
        result = fn()
    except KVPoolError as exc:
        result = exc
    return result, time.monotonic() - started


@pytest.fixture
def client():
    made = []

    def make(service: LyingLookup, timeout: float = TIMEOUT_S) -> LookupClient:
        c = LookupClient(service.url, timeout=timeout, transport="tcp")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_truthful_service_is_believed(client):
    with LyingLookup(truthful) as service:
        assert client(service).locate(KEYS) == TRUTH


def _drip(every_s: float):
    def answer(sock, request):
        reply = lp.encode_located(TRUTH, lp.encode_info)
        for i in range(len(reply)):
            sock.sendall(reply[i : i + 1])
            time.sleep(every_s)

    return answer


@pytest.mark.parametrize(
    "answer",
    [_drip(0.1), lambda sock, request: time.sleep(10),
     lambda sock, request: sock.sendall(lp.encode_located(TRUTH, lp.encode_info)[:20]) or time.sleep(10)],
    ids=["drip", "stall", "stall-mid-body"],
)  # fmt: skip
def test_never_waits_past_the_timeout(client, answer):
    with LyingLookup(answer) as service:
        c = client(service)
        result, elapsed = outcome(lambda: c.locate(KEYS))
        assert isinstance(result, KVPoolError), result
        assert elapsed <= TIMEOUT_S + MARGIN_S, elapsed


def test_pipelined_drip_is_cut_per_reply(client):
    with LyingLookup(_drip(0.1)) as service:
        c = client(service)
        result, elapsed = outcome(lambda: c.locate_many([KEYS] * 4, window=4))
        assert isinstance(result, KVPoolError), result
        assert elapsed <= TIMEOUT_S + MARGIN_S, elapsed


def test_a_huge_announced_body_is_not_allocated_up_front(client):
    """The header announces the largest body a reply may have (hundreds of MB), then 10 bytes
    come and the service closes: the client's memory follows the 10 bytes."""
    announced = lp.max_reply_body(len(KEYS))
    assert announced > 100 << 20

    def answer(sock, request):
        sock.sendall(lp.REPLY.pack(lp.STATUS_OK, 0, 1, 0, announced) + b"x" * 10)
        return False

    with LyingLookup(answer) as service:
        c = client(service)
        tracemalloc.start()
        try:
            result, _ = outcome(lambda: c.locate(KEYS))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(result, KVPoolError), result
        assert peak < 16 << 20, peak


LIES = {
    "long": lambda s, r: s.sendall(lp.encode_located(TRUTH, lp.encode_info) + b"\0" * 7),
    "short-then-close": lambda s, r: s.sendall(lp.encode_located(TRUTH, lp.encode_info)[:-3]) or False,
    "prefix-beyond-query": lambda s, r: s.sendall(
        lp.encode_located(Located(r.count + 1, [], True), lp.encode_info)),
    "run-beyond-prefix": lambda s, r: s.sendall(lp.encode_located(
        Located(1, [HolderMatch(TRUTH.holders[0].info, 5, b"\x01")], True), lp.encode_info)),
    "unknown-flags": lambda s, r: s.sendall(lp.REPLY.pack(lp.STATUS_OK, 0x80, 0, 0, 0)),
    "error-status": lambda s, r: s.sendall(lp.encode_error(lp.STATUS_INTERNAL, "boom")) or False,
    "huge-error-message": lambda s, r: s.sendall(lp.REPLY.pack(lp.STATUS_INTERNAL, 0, 0, 0, 1 << 30)),
    "close": lambda s, r: False,
}  # fmt: skip


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lies_are_errors(client, lie):
    with LyingLookup(LIES[lie]) as service:
        c = client(service)
        for _ in range(2):
            result, elapsed = outcome(lambda: c.locate(KEYS))
            assert isinstance(result, KVPoolError), result
            assert elapsed <= TIMEOUT_S + MARGIN_S, elapsed


@settings(max_examples=socket_examples(), deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_garbage_replies(garbage, close):
    def answer(sock, request):
        sock.sendall(garbage)
        return not close

    with LyingLookup(answer) as service, LookupClient(service.url, timeout=0.2, transport="tcp") as c:
        result, elapsed = outcome(lambda: c.locate(KEYS))
        assert isinstance(result, KVPoolError) or result.prefix <= len(KEYS)
        assert elapsed <= 0.2 + MARGIN_S
