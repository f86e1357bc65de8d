"""The record frame every tier stores: a small fixed header, the key, then the value.

Pure logic, no I/O. The checksum is xxh3-64 over key and value: fast enough that verifying
every read costs little next to moving the bytes (see docs/benchmarks.md).

Layout (little endian, 24 bytes):  magic "KVPR" | version u8 | flags u8 | key_len u16 |
value_len u64 | xxh3_64(key || value) u64
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from kvpool.cachenode.core.errors import RecordError

MAGIC = b"KVPR"
VERSION = 1
HEADER = struct.Struct("<4sBBHQQ")
HEADER_SIZE = HEADER.size
MAX_KEY_SIZE = 64


@dataclass(frozen=True, slots=True)
class RecordHeader:
    key_len: int
    value_len: int
    checksum: int
    flags: int = 0

    @property
    def total_size(self) -> int:
        return HEADER_SIZE + self.key_len + self.value_len


def checksum(key: bytes, value) -> int:
    h = xxhash.xxh3_64()
    h.update(key)
    h.update(value)
    return h.intdigest()


def encode_header(key: bytes, value, flags: int = 0) -> bytes:
    """Header followed by the key; write the value after it without concatenating."""
    if not 0 < len(key) <= MAX_KEY_SIZE:
        raise RecordError(f"key must be 1..{MAX_KEY_SIZE} bytes, got {len(key)}")
    value_len = memoryview(value).nbytes
    return HEADER.pack(MAGIC, VERSION, flags, len(key), value_len, checksum(key, value)) + key


def encode(key: bytes, value) -> bytes:
    """The whole record as one bytes object (for tiers that want a single value)."""
    return encode_header(key, value) + bytes(value)


def decode_header(data) -> RecordHeader:
    if len(data) < HEADER_SIZE:
        raise RecordError(f"record shorter than its header ({len(data)} < {HEADER_SIZE} bytes)")
    magic, version, flags, key_len, value_len, digest = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise RecordError(f"bad magic {magic!r}")
    if version != VERSION:
        raise RecordError(f"unsupported record version {version}")
    if not 0 < key_len <= MAX_KEY_SIZE:
        raise RecordError(f"bad key length {key_len}")
    return RecordHeader(key_len=key_len, value_len=value_len, checksum=digest, flags=flags)


def decode(data, expected_key: bytes | None = None) -> memoryview:
    """Verify a whole record and return a view of its value (no copy)."""
    view = memoryview(data).cast("B")
    header = decode_header(view)
    if len(view) != header.total_size:
        raise RecordError(f"record is {len(view)} bytes, header says {header.total_size}")
    key = bytes(view[HEADER_SIZE : HEADER_SIZE + header.key_len])
    if expected_key is not None and key != expected_key:
        raise RecordError("record belongs to another key")
    value = view[HEADER_SIZE + header.key_len :]
    if checksum(key, value) != header.checksum:
        raise RecordError("checksum mismatch")
    return value
