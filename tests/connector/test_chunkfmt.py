"""Chunk format: round trip, and every mismatch or corruption is rejected."""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct

import pytest
import xxhash

from kvpool.connector import chunkfmt
from kvpool.connector.chunkfmt import (
    HEADER_SIZE,
    ChunkFormatError,
    ChunkSpec,
    ChunkVersionError,
    decode,
    encode,
    payload_view,
    seal,
)

SPEC = ChunkSpec(
    key=b"k" * 32, fingerprint=b"f" * 32, dtype="bfloat16", shape=(2, 2, 16, 2, 8), token_count=16
)
PAYLOAD = os.urandom(SPEC.payload_size)


def test_round_trip():
    data = encode(SPEC, PAYLOAD)
    assert len(data) == HEADER_SIZE + len(PAYLOAD)
    assert bytes(decode(data, SPEC)) == PAYLOAD


@pytest.mark.parametrize(
    "change",
    [
        {"key": b"x" * 32},
        {"fingerprint": b"g" * 32},
        {"dtype": "float16"},
        {"shape": (2, 2, 16, 1, 16)},
        {"token_count": 15},
        {"codec": 1},
    ],
)
def test_mismatched_expectation_is_rejected(change):
    data = encode(SPEC, PAYLOAD)
    with pytest.raises(ChunkFormatError):
        decode(data, dataclasses.replace(SPEC, **change))


def test_every_single_byte_flip_is_rejected():
    data = bytearray(encode(SPEC, PAYLOAD))
    # every header byte, and a sample of payload bytes
    for pos in [*range(HEADER_SIZE), HEADER_SIZE, len(data) // 2, len(data) - 1]:
        corrupt = bytearray(data)
        corrupt[pos] ^= 0x01
        with pytest.raises(ChunkFormatError):
            decode(bytes(corrupt), SPEC)


def test_truncated_and_extended_are_rejected():
    data = encode(SPEC, PAYLOAD)
    for bad in (data[:10], data[:-1], data + b"\0", b""):
        with pytest.raises(ChunkFormatError):
            decode(bad, SPEC)


def test_wrong_payload_size_cannot_be_encoded():
    with pytest.raises(ChunkFormatError):
        encode(SPEC, PAYLOAD[:-2])


def test_wrong_version_is_rejected(monkeypatch):
    data = encode(SPEC, PAYLOAD)
    monkeypatch.setattr(chunkfmt, "FORMAT_VERSION", 3)
    with pytest.raises(ChunkVersionError):
        decode(data, SPEC)


def _version_1(spec: ChunkSpec, payload: bytes) -> bytes:
    """A chunk as kvpool wrote it before the header became a page (124-byte header)."""
    prefix = struct.pack(
        "<4sHBBBBH6IIIQ32s32s", b"KVPC", 1, 1, chunkfmt.DTYPES[spec.dtype], 0, len(spec.shape), 0,
        *spec.shape, *[0] * (6 - len(spec.shape)), spec.token_count, 0, len(payload), spec.fingerprint,
        spec.key,
    )  # fmt: skip
    digest = xxhash.xxh3_64(prefix + payload).intdigest()
    return prefix + struct.pack("<Q", digest) + payload


@pytest.mark.parametrize("size", [SPEC.payload_size, 8])  # a real one, and one shorter than a page
def test_a_version_1_chunk_is_a_clean_miss(size):
    spec = dataclasses.replace(SPEC, shape=(size // 2,), token_count=1) if size == 8 else SPEC
    old = _version_1(spec, os.urandom(spec.payload_size))
    assert len(old) == 124 + spec.payload_size
    with pytest.raises(ChunkVersionError, match="version 1"):
        decode(old, spec)


def test_the_header_is_one_page_so_the_payload_of_an_aligned_value_is_aligned():
    assert HEADER_SIZE == mmap.PAGESIZE == 4096
    data = encode(SPEC, PAYLOAD)
    assert data[chunkfmt._PREFIX.size + 8 : HEADER_SIZE] == bytes(HEADER_SIZE - chunkfmt._PREFIX.size - 8)
    assert SPEC.encoded_size == len(data)


def test_seal_writes_the_header_in_front_of_a_payload_in_place():
    buffer = bytearray(SPEC.encoded_size)
    payload_view(buffer, SPEC)[:] = PAYLOAD
    seal(SPEC, buffer)
    assert bytes(buffer) == encode(SPEC, PAYLOAD)
    assert bytes(decode(buffer, SPEC)) == PAYLOAD
    with pytest.raises(ChunkFormatError):
        seal(SPEC, bytearray(SPEC.encoded_size - 1))
