"""Decoders of what comes back from disk and from shared tiers: the record frame (core/record.py),
the connector's chunk format (connector/chunkfmt.py), the disk tier's files (tiers/disk_files.py
through a real DiskTier on a real directory), Redis/Valkey manifests and the RESP reply reader
(tiers/redis.py, the reader over a real socket pair). Round trips; mutated bytes decode to the
original value or raise the module's error (RecordError, ChunkFormatError), nothing else, and
never a wrong value; a length field is checked against its limit before anything is allocated."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import tracemalloc

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kvpool.cachenode.core import record
from kvpool.cachenode.core.errors import RecordError
from kvpool.cachenode.server.tiers import redis as rt
from kvpool.cachenode.server.tiers.disk import DiskTier
from kvpool.connector import chunkfmt as cf

from .strategies import keys, mutated

values = st.binary(max_size=2048)


# -- the record frame -----------------------------------------------------------------------------
@given(keys, values)
def test_record_round_trip(key, value):
    assert bytes(record.decode(record.encode(key, value), expected_key=key)) == value


@given(st.data(), keys, values)
def test_mutated_records_are_refused_never_misread(data, key, value):
    frame = record.encode(key, value)
    bad = data.draw(mutated(frame))
    try:
        got = record.decode(bad, expected_key=key)
    except RecordError:
        return
    assert bytes(got) == value  # only a mutation that changed nothing that matters decodes


@given(st.binary(max_size=200))
def test_record_headers_decode_or_record_error(data):
    try:
        header = record.decode_header(data)
    except RecordError:
        return
    assert 0 < header.key_len <= record.MAX_KEY_SIZE


# -- the chunk format -----------------------------------------------------------------------------
@st.composite
def chunks(draw):
    dtype = draw(st.sampled_from(sorted(cf.DTYPES)))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=cf.MAX_DIMS)))
    spec = cf.ChunkSpec(
        key=draw(st.binary(min_size=32, max_size=32)),
        fingerprint=draw(st.binary(min_size=32, max_size=32)),
        dtype=dtype,
        shape=shape,
        token_count=draw(st.integers(0, 1 << 16)),
    )
    return spec, draw(st.binary(min_size=spec.payload_size, max_size=spec.payload_size))


@given(chunks())
def test_chunk_round_trip(chunk):
    spec, payload = chunk
    assert bytes(cf.decode(cf.encode(spec, payload), spec)) == payload
    buffer = bytearray(spec.encoded_size)
    cf.payload_view(buffer, spec)[:] = payload
    cf.seal(spec, buffer)
    assert bytes(buffer) == cf.encode(spec, payload)


def _chunk_mutants(data, frame: bytes) -> bytes:
    """Mutations anywhere, and flips inside the header's fields (where random ones rarely land)."""
    if data.draw(st.booleans()):
        return data.draw(mutated(frame))
    bad = bytearray(frame)
    i = data.draw(st.integers(0, 200))
    bad[i] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(bad)


@given(st.data(), chunks())
def test_mutated_chunks_are_misses_never_wrong_kv(data, chunk):
    spec, payload = chunk
    bad = _chunk_mutants(data, cf.encode(spec, payload))
    try:
        got = cf.decode(bad, spec)
    except cf.ChunkFormatError:
        return
    assert bytes(got) == payload


@given(chunks(), st.binary(max_size=5000))
def test_random_bytes_are_not_chunks(chunk, data):
    spec, _ = chunk
    with pytest.raises(cf.ChunkFormatError):
        cf.decode(data, spec)


# -- the disk tier's files --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return DiskTier(tmp_path_factory.mktemp("fuzz-disk"), 64 << 20, fsync=False)


@given(st.data(), keys, values)
def test_damaged_record_files_are_misses(disk, data, key, value):
    """A record file changed behind the tier's back (bit flips, cut short, grown, replaced by
    garbage): get gives the value or None, never other bytes, and a bad file is removed."""
    disk.delete(key)  # an earlier example's record of the same key, if it is still there
    assert disk.put(key, value)
    path = disk.path_of(key)
    with open(path, "rb") as f:
        frame = f.read()
    with open(path, "wb") as f:
        f.write(data.draw(st.one_of(mutated(frame), st.binary(max_size=300))))
    got = disk.get(key)
    if got is None:
        assert not os.path.exists(path) and key not in disk  # removed and forgotten
    else:
        assert bytes(got) == value
        disk.delete(key)


def test_a_file_announcing_a_huge_value_allocates_nothing_for_it(disk):
    """The header's value length says 1 TiB; the file is 100 bytes: refused before allocating."""
    key = b"huge-length"
    assert disk.put(key, b"v" * 10)
    head = record.HEADER.pack(record.MAGIC, record.VERSION, 0, len(key), 1 << 40, 0) + key
    with open(disk.path_of(key), "wb") as f:
        f.write(head + b"x" * 10)
    tracemalloc.start()
    try:
        assert disk.get(key) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# -- Redis/Valkey manifests and replies -------------------------------------------------------------
@st.composite
def manifests(draw):
    key = draw(keys)
    part_size = draw(st.integers(1, 1 << 20))
    value_len = draw(st.integers(1, 1 << 24))
    head = (
        record.HEADER.pack(
            record.MAGIC, record.VERSION, 0, len(key), value_len, draw(st.integers(0, (1 << 64) - 1))
        )
        + key
    )
    size = len(head) + value_len
    parts = rt.part_count(size, len(head), part_size)
    assume(parts < 1 << 16)
    return rt.Manifest(parts, part_size, size, draw(st.binary(min_size=8, max_size=8)), head)


@given(manifests())
def test_manifest_round_trip(manifest):
    assert rt.Manifest.decode(manifest.encode(), 1 << 30) == manifest


@given(st.data(), manifests(), st.integers(0, 1 << 30))
def test_mutated_manifests_are_checked_before_anything_is_allocated(data, manifest, limit):
    bad = data.draw(st.one_of(mutated(manifest.encode()), st.binary(max_size=200)))
    try:
        got = rt.Manifest.decode(bad, limit)
    except RecordError:
        return
    assert got.record_size <= limit and got.part_size <= rt.MAX_REDIS_PART
    assert got.parts == rt.part_count(got.record_size, len(got.record_header), got.part_size)
    assert got.record_size == len(got.record_header) + record.decode_header(got.record_header).value_len


def _reader_over(payload: bytes, max_bulk: int):
    """A _ReplyReader on one end of a socket pair; the other end sends `payload` and closes."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)

    def send() -> None:
        with contextlib.suppress(OSError):
            theirs.sendall(payload)
        theirs.close()

    threading.Thread(target=send, daemon=True).start()
    return ours, rt._ReplyReader(ours, max_bulk)


def _resp(values_: list[bytes | None]) -> bytes:
    return b"".join(b"$-1\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in values_)


@given(st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=5))
def test_reply_reader_round_trip(replies):
    sock, reader = _reader_over(_resp(replies), 1000)
    with sock:
        got = [reader.bulk_into(None) for _ in replies]
    assert [None if g is None else bytes(g) for g in got] == replies


@given(st.data(), st.lists(st.one_of(st.none(), st.binary(max_size=300)), min_size=1, max_size=5))
def test_reply_reader_on_garbage(data, replies):
    """Anything a server might send: values, a miss, ResponseError or ConnectionError (the
    tier then drops the connection), nothing else; never a value longer than the limit."""
    payload = data.draw(st.one_of(mutated(_resp(replies)), st.binary(max_size=100)))
    sock, reader = _reader_over(payload, 400)
    with sock:
        try:
            for _ in replies:
                got = reader.bulk_into(None)
                assert got is None or len(got) <= 400
        except (ConnectionError, rt.ResponseError):
            pass


@pytest.mark.parametrize("line", [b"$%d\r\n" % (1 << 40), b"$99999999999999999999999\r\n"])
def test_bulk_length_over_the_limit_allocates_nothing(line):
    sock, reader = _reader_over(line + b"xx", 1 << 20)
    tracemalloc.start()
    try:
        with sock, pytest.raises(ConnectionError, match="over the"):
            reader.bulk_into(None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_reply_lines_are_bounded():
    sock, reader = _reader_over(b"+" + b"x" * (rt.MAX_REPLY_LINE * 2), 1 << 20)
    with sock, pytest.raises(ConnectionError, match="reply line longer"):
        reader.bulk_into(None)
