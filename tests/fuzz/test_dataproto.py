"""The data channel's decoders (rpc/dataproto.py) on valid, mutated and random frames: a frame
decodes to what was encoded, or raises FrameError; every length is checked against its limit
before the bytes it announces are read."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpool.cachenode.core.record import MAX_KEY_SIZE
from kvpool.cachenode.rpc import dataproto as dp

from .strategies import frames_or_mutants, key_lists, keys

MAX_BATCH = 64
u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


def decode_request(frame: bytes, max_batch_keys: int = MAX_BATCH):
    """What the node does with one request (dataserver._handle): header, then at most the table
    length the header may announce, then the entries or a control op's arguments and keys."""
    if len(frame) < dp.REQUEST_STRUCT.size:
        return None  # the node waits for more (or sees the client gone)
    op, count, table_len = dp.parse_request_header(frame[: dp.REQUEST_STRUCT.size], max_batch_keys)
    assert count <= max_batch_keys
    assert table_len <= dp.max_table_len(op, count)  # bounded before anything is read for it
    table = frame[dp.REQUEST_STRUCT.size : dp.REQUEST_STRUCT.size + table_len]
    if len(table) < table_len:
        return None
    if op in dp.CONTROL_OPS:
        return op, dp.parse_control(op, count, table)
    return op, dp.parse_table(op, count, table)


def requests() -> st.SearchStrategy[bytes]:
    sized = st.lists(st.tuples(keys, u64), max_size=10)
    return st.one_of(
        key_lists.map(dp.encode_get),
        sized.map(dp.encode_put),
        st.just(dp.encode_ping()),
        key_lists.map(dp.encode_prefix_hits),
        key_lists.map(dp.encode_contains),
        st.builds(dp.encode_lease, key_lists, u32, u64),
        st.builds(dp.encode_release, u64, key_lists),
        st.builds(lambda i, k: dp.encode_release(i, k, op=dp.OP_UNPIN), u64, key_lists),
        st.builds(dp.encode_locate, key_lists, u32, u64),
    )


# -- round trips ---------------------------------------------------------------------------------
@given(st.binary(max_size=dp.MAX_TOKEN_LEN))
def test_hello_round_trip(token):
    frame = dp.encode_hello(token)
    assert dp.parse_hello(frame[: dp.HELLO_STRUCT.size]) == len(token)
    assert frame[dp.HELLO_STRUCT.size :] == token


@given(key_lists)
def test_get_round_trip(ks):
    assert decode_request(dp.encode_get(ks)) == (dp.OP_GET, [(k, -1) for k in ks])


@given(st.lists(st.tuples(keys, u64), max_size=MAX_BATCH))
def test_put_round_trip(entries):
    assert decode_request(dp.encode_put(entries)) == (dp.OP_PUT, entries)


@given(key_lists, u32, u64)
def test_control_round_trips(ks, lease_ms, lease_id):
    assert decode_request(dp.encode_prefix_hits(ks)) == (dp.OP_PREFIX_HITS, ((), ks))
    assert decode_request(dp.encode_contains(ks)) == (dp.OP_CONTAINS, ((), ks))
    assert decode_request(dp.encode_lease(ks, lease_ms, lease_id)) == (
        dp.OP_LEASE,
        ((lease_ms, lease_id), ks),
    )
    assert decode_request(dp.encode_locate(ks, lease_ms, lease_id)) == (
        dp.OP_LOCATE,
        ((lease_ms, lease_id), ks),
    )
    assert decode_request(dp.encode_release(lease_id, ks)) == (dp.OP_RELEASE, ((lease_id,), ks))


@given(st.lists(st.integers(-1, 1 << 40), max_size=50))
def test_sizes_round_trip(sizes):
    assert dp.parse_sizes(dp.encode_sizes(sizes), len(sizes)) == tuple(sizes)


@given(st.lists(st.booleans(), max_size=100))
def test_flags_round_trip(flags):
    assert dp.parse_flags(dp.encode_flags(flags)) == flags


@given(st.integers(0, 255), u32, st.text(max_size=2000))
def test_status_is_bounded(status, count, message):
    frame = dp.encode_status(status, count, message)
    got_status, got_count = dp.STATUS_STRUCT.unpack_from(frame)
    assert (got_status, got_count) == (status, count)
    if status != dp.STATUS_OK:
        (length,) = dp.MSG_LEN.unpack_from(frame, dp.STATUS_STRUCT.size)
        assert length <= 1024 and len(frame) == dp.STATUS_STRUCT.size + dp.MSG_LEN.size + length


# -- arbitrary and mutated input: FrameError or a checked result, nothing else ----------------------
@given(frames_or_mutants(requests()), st.integers(0, MAX_BATCH))
def test_requests_decode_or_frame_error(frame, max_keys):
    try:
        got = decode_request(frame, max_keys)
    except dp.FrameError:
        return
    if got is None:
        return
    op, body = got
    entries = body[1] if op in dp.CONTROL_OPS else [k for k, _ in body]
    assert len(entries) <= max_keys
    assert all(0 < len(k) <= MAX_KEY_SIZE for k in entries)


@given(st.binary(min_size=dp.HELLO_STRUCT.size, max_size=dp.HELLO_STRUCT.size))
def test_hello_header_checked(header):
    try:
        n = dp.parse_hello(header)
    except dp.FrameError:
        return
    assert header[:4] == dp.MAGIC and 0 <= n <= dp.MAX_TOKEN_LEN


@given(st.binary(min_size=dp.REQUEST_STRUCT.size, max_size=dp.REQUEST_STRUCT.size), st.integers(0, 100_000))
def test_request_header_bounds_every_length(header, max_keys):
    try:
        op, count, table_len = dp.parse_request_header(header, max_keys)
    except dp.FrameError:
        return
    assert op in dp.KNOWN_OPS and count <= max_keys
    # the most the node reads for the table: 73 bytes per key (a put entry) plus 12 of arguments
    assert table_len <= count * (1 + MAX_KEY_SIZE + 8) + 12


@given(st.sampled_from(sorted(dp.KNOWN_OPS)), st.integers(0, 40), st.binary(max_size=600))
def test_tables_decode_or_frame_error(op, count, table):
    try:
        if op in dp.CONTROL_OPS:
            _, ks = dp.parse_control(op, count, table)
            entries = [(k, -1) for k in ks]
        else:
            entries = dp.parse_table(op, count, table)
    except dp.FrameError:
        return
    assert len(entries) == count
    assert all(0 < len(k) <= MAX_KEY_SIZE for k, _ in entries)
    assert all(0 <= s < 1 << 64 for _, s in entries if op == dp.OP_PUT)


@given(st.binary(max_size=64))
def test_flags_decode_or_frame_error(data):
    try:
        flags = dp.parse_flags(data)
    except dp.FrameError:
        assert any(b > 1 for b in data)
        return
    assert len(flags) == len(data)


def test_token_too_long_is_refused():
    with pytest.raises(dp.FrameError):
        dp.encode_hello(b"x" * (dp.MAX_TOKEN_LEN + 1))
    header = struct.pack("<4sBH", dp.MAGIC, dp.VERSION, dp.MAX_TOKEN_LEN + 1)
    with pytest.raises(dp.FrameError, match="token length"):
        dp.parse_hello(header)
