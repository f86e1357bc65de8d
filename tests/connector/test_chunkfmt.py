"""Chunk format: round trip, and every mismatch or corruption is rejected."""

from __future__ import annotations

import dataclasses
import os

import pytest

from kvpool.connector import chunkfmt
from kvpool.connector.chunkfmt import HEADER_SIZE, ChunkFormatError, ChunkSpec, decode, encode

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
    monkeypatch.setattr(chunkfmt, "FORMAT_VERSION", 2)
    with pytest.raises(ChunkFormatError):
        decode(data, SPEC)
