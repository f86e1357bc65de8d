"""The pool client against a node that lies on the data channel: short or long values, wrong
counts, garbage frames, a slow drip, a stall. The client raises a KVPoolError or reports a miss;
it never returns bytes other than the value stored, and never waits past its timeout (plus
MARGIN_S: one gRPC Hello and thread scheduling on a loaded 2-core machine)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.cachenode import Client
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.core.errors import KVPoolError
from kvpool.cachenode.rpc import dataproto as dp

from ..fuzz.profiles import socket_examples
from .liar import LyingNode, get_reply

TIMEOUT_S = 1.0
MARGIN_S = 0.75
KEY = b"k" * 32
VALUE = bytes(range(256)) * 4  # what the node "stores" under KEY


def honest(sock, op, entries, values):
    if op == dp.OP_GET:
        held = [k == KEY for k, _ in entries]
        sock.sendall(get_reply([len(VALUE) if h else -1 for h in held], [VALUE] * sum(held)))
    elif op == dp.OP_PUT:
        sock.sendall(dp.encode_status(dp.STATUS_OK, len(entries)))
    elif op == dp.OP_PREFIX_HITS:
        sock.sendall(dp.encode_status(dp.STATUS_OK, 0))
    else:
        sock.sendall(dp.encode_status(dp.STATUS_INVALID, 0, "no"))


def outcome(fn):
    """(result or the KVPoolError raised, seconds taken)."""
    started = time.monotonic()
    try:
        result = fn()
    except KVPoolError as exc:
        result = exc
    return result, time.monotonic() - started


def only_true_bytes(result) -> None:
    assert result is None or isinstance(result, KVPoolError) or bytes(result) == VALUE, result[:32]


@pytest.fixture
def client():
    made = []

    def make(node: LyingNode) -> Client:
        c = Client(node.url, timeout=TIMEOUT_S, transport="grpc")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_honest_liar_is_believed(client):
    """The control: this server answers correctly when it does not lie."""
    with LyingNode(honest) as node:
        c = client(node)
        assert c.get(KEY) == VALUE
        assert c.get(b"x" * 32) is None


def _drip(reply: bytes, every_s: float):
    def answer(sock, op, entries, values):
        for i in range(len(reply)):
            sock.sendall(reply[i : i + 1])
            time.sleep(every_s)

    return answer


@pytest.mark.parametrize(
    "answer",
    [
        _drip(get_reply([len(VALUE)], [VALUE]), 0.05),  # each byte well inside the timeout
        lambda sock, op, entries, values: (
            sock.sendall(get_reply([len(VALUE)], [VALUE[:10]])) or time.sleep(10)
        ),
        lambda sock, op, entries, values: time.sleep(10),
    ],
    ids=["drip", "stall-mid-value", "stall"],
)
def test_never_waits_past_the_timeout(client, answer):
    with LyingNode(answer) as node:
        c = client(node)
        c.members()  # hello and members done: the get is timed alone
        result, elapsed = outcome(lambda: c.get(KEY))
        assert isinstance(result, KVPoolError), result
        assert elapsed <= TIMEOUT_S + MARGIN_S, elapsed


def test_control_op_drip_is_cut_at_the_timeout():
    with LyingNode(_drip(dp.encode_status(dp.STATUS_OK, 1), 0.3)) as node:
        conn = NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=TIMEOUT_S))
        conn.hello()
        result, elapsed = outcome(lambda: conn.prefix_hits([KEY, KEY]))
        conn.close()
        assert isinstance(result, KVPoolError), result
        assert elapsed <= TIMEOUT_S + MARGIN_S, elapsed


LIES = {
    "short-then-close": lambda s, op, e, v: s.sendall(get_reply([len(VALUE)], [VALUE[:100]])) or False,
    "long": lambda s, op, e, v: s.sendall(get_reply([100], [VALUE])),
    "more-sizes": lambda s, op, e, v: s.sendall(get_reply([len(VALUE), len(VALUE)], [VALUE, VALUE])),
    "fewer-sizes": lambda s, op, e, v: s.sendall(get_reply([], [])),
    "over-limit": lambda s, op, e, v: s.sendall(get_reply([1 << 40], [])),
    "negative": lambda s, op, e, v: s.sendall(get_reply([-5], [])),
    "error-status": lambda s, op, e, v: s.sendall(dp.encode_status(dp.STATUS_INTERNAL, 0, "boom")),
    "bad-status-length": lambda s, op, e, v: (
        s.sendall(dp.STATUS_STRUCT.pack(9, 0) + b"\xff\xff" + b"x" * 10) or False
    ),
    "close": lambda s, op, e, v: False,
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lies_are_errors_or_misses_never_wrong_bytes(client, lie):
    with LyingNode(LIES[lie]) as node:
        c = client(node)
        for _ in range(3):  # pooled connections: a lie must not poison the next call either
            result, elapsed = outcome(lambda: c.get(KEY))
            only_true_bytes(result)
            assert elapsed <= TIMEOUT_S + MARGIN_S
        node.answer = honest
        time.sleep(0)  # the next call may find the node marked down: a miss or an error, not bytes
        result, _ = outcome(lambda: c.get(KEY))
        only_true_bytes(result)


def test_long_value_on_a_reused_connection_is_not_believed():
    """A reply longer than announced leaves bytes on the connection; the next reply must not be
    read from them (here they would frame a well-formed reply carrying the wrong value)."""
    forged = get_reply([len(VALUE)], [bytes(len(VALUE))])  # right size, wrong bytes

    def answer(sock, op, entries, values):
        sock.sendall(get_reply([len(VALUE)], [VALUE]) + forged)

    with LyingNode(answer) as node:
        conn = NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=TIMEOUT_S, data_connections=1))
        results = []
        for _ in range(3):
            result, _ = outcome(lambda: conn.get_many([KEY]).get(KEY))
            results.append(result)
        conn.close()
    for result in results:
        only_true_bytes(result)


def test_a_huge_announced_value_is_not_allocated_up_front():
    """The node's Hello allows values of 2**62 bytes and its reply announces a 1 TiB value, then
    10 bytes come and it closes: an error, and the client's memory follows the 10 bytes."""
    import tracemalloc

    def answer(sock, op, entries, values):
        sock.sendall(get_reply([1 << 40], [b"x" * 10]))
        return False

    with LyingNode(answer, max_value_size=1 << 62) as node:
        conn = NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=TIMEOUT_S))
        conn.hello()
        tracemalloc.start()
        try:
            result, _ = outcome(lambda: conn.get_many([KEY]))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            conn.close()
    assert isinstance(result, KVPoolError), result
    assert peak < 256 << 20, peak


@settings(max_examples=socket_examples(), deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_garbage_replies(garbage, close):
    def answer(sock, op, entries, values):
        sock.sendall(garbage)
        return not close

    with LyingNode(answer) as node:
        conn = NodeConnection("127.0.0.1", node.port, ConnectOptions(timeout=0.2))
        try:
            result, elapsed = outcome(lambda: conn.get_many([KEY]).get(KEY))
            only_true_bytes(result)
            assert elapsed <= 0.2 + MARGIN_S
            result, elapsed = outcome(lambda: conn.prefix_hits([KEY]))
            assert isinstance(result, KVPoolError) or 0 <= result <= 1
        finally:
            conn.close()
