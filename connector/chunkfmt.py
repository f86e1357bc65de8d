"""The self-describing chunk format (DESIGN.md §3): one header page, then the KV payload.

Pure logic, no I/O, no torch. Every chunk the connector stores carries this header on every tier
and wire, so a reader can prove that the bytes are the KV it asked for — same key, same model
fingerprint, same layout, dtype and shape, intact payload — before a single byte reaches the engine.
Anything else is a miss (``ChunkFormatError``), never a wrong answer.

Header (little endian), padded with zeros to ``HEADER_SIZE`` = 4096 bytes (one page):
    magic "KVPC" | version u16 | layout u8 | dtype u8 | codec u8 | ndim u8 | pad u16 |
    shape 6 x u32 | token_count u32 | pad u32 | payload_len u64 |
    fingerprint digest 32 B | chunk key 32 B | xxh3_64 checksum u64 | zeros
The checksum covers the header bytes before it and the payload, so a flipped header bit is caught
even in a field the reader does not compare; the padding must be zeros.

Why a whole page: a value received into a page-aligned buffer (the client's pooled receive
buffers, a NIXL-registered region, an O_DIRECT read) then has its payload page-aligned too, so the
payload can be handed to a copy kernel or a DMA engine in place; and a writer can copy a chunk
straight into the payload of such a buffer and write the header in front afterwards (``seal``).

Version 1 (a 124-byte header, kvpool before issue 11) is refused with ``ChunkVersionError``: a
miss, and the connector deletes it: every lookup would find it again and no engine of this version
can read it, so the chunk it recomputes must replace it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVPC"
FORMAT_VERSION = 2
MAX_DIMS = 6
HEADER_SIZE = 4096  # one page: the payload of a page-aligned value is page-aligned

#: The only chunk layout so far: [layers, 2 (K then V), tokens, kv_heads, head_dim], each layer
#: contiguous so that a reader can hand layer i to the engine while layer i+1 is still arriving.
LAYOUT_LKTHD = 1
LAYOUT_NAMES = {LAYOUT_LKTHD: "LKTHD"}

CODEC_RAW = 0

DTYPES = {"float32": 1, "float16": 2, "bfloat16": 3, "float8_e4m3fn": 4, "float8_e5m2": 5, "uint8": 6}
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "uint8": 1}

_MAGIC_VERSION = struct.Struct("<4sH")
_PREFIX = struct.Struct("<4sHBBBBH" + "I" * MAX_DIMS + "IIQ32s32s")
_CHECKSUM = struct.Struct("<Q")
_FIELDS_END = _PREFIX.size + _CHECKSUM.size
_ZEROS = bytes(HEADER_SIZE - _FIELDS_END)


class ChunkFormatError(ValueError):
    """The bytes are not the chunk the reader expected; treat as a miss."""


class ChunkVersionError(ChunkFormatError):
    """A well-formed chunk of another format version: a miss, but not damage."""


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    """What a reader expects, and what a writer declares."""

    key: bytes
    fingerprint: bytes
    dtype: str
    shape: tuple[int, ...]
    token_count: int
    layout: int = LAYOUT_LKTHD
    codec: int = CODEC_RAW

    @property
    def payload_size(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def encoded_size(self) -> int:
        """Bytes of the whole value: the header page and the payload."""
        return HEADER_SIZE + self.payload_size


def _prefix(spec: ChunkSpec, payload_len: int) -> bytes:
    if spec.dtype not in DTYPES:
        raise ChunkFormatError(f"unsupported dtype {spec.dtype}")
    if len(spec.shape) > MAX_DIMS or len(spec.key) != 32 or len(spec.fingerprint) != 32:
        raise ChunkFormatError("bad shape, key or fingerprint size")
    dims = list(spec.shape) + [0] * (MAX_DIMS - len(spec.shape))
    return _PREFIX.pack(
        MAGIC, FORMAT_VERSION, spec.layout, DTYPES[spec.dtype], spec.codec, len(spec.shape), 0,
        *dims, spec.token_count, 0, payload_len, spec.fingerprint, spec.key,
    )  # fmt: skip


def _checksum(prefix, payload) -> int:
    h = xxhash.xxh3_64()
    h.update(prefix)
    h.update(payload)
    return h.intdigest()


def _header(spec: ChunkSpec, payload) -> bytes:
    prefix = _prefix(spec, payload.nbytes)
    return b"".join((prefix, _CHECKSUM.pack(_checksum(prefix, payload)), _ZEROS))


def encode(spec: ChunkSpec, payload) -> bytes:
    """Header + payload as one new bytes object (tools and tests; the connector uses ``seal``)."""
    view = memoryview(payload).cast("B")
    if view.nbytes != spec.payload_size:
        raise ChunkFormatError(f"payload is {view.nbytes} bytes, spec says {spec.payload_size}")
    return b"".join((_header(spec, view), view))


def payload_view(buffer, spec: ChunkSpec) -> memoryview:
    """Where a writer puts the payload of ``spec`` inside a value buffer of ``spec.encoded_size``."""
    view = memoryview(buffer).cast("B")
    if view.nbytes != spec.encoded_size:
        raise ChunkFormatError(f"buffer is {view.nbytes} bytes, the chunk {spec.encoded_size}")
    return view[HEADER_SIZE:]


def seal(spec: ChunkSpec, buffer) -> None:
    """Write the header in front of the payload already in ``buffer`` (see ``payload_view``):
    the value is then complete, without copying the payload."""
    view = memoryview(buffer).cast("B")
    payload = payload_view(view, spec)
    view[:HEADER_SIZE] = _header(spec, payload)


def decode(data, expected: ChunkSpec) -> memoryview:
    """Verify every header field against ``expected`` and the checksum; return the payload view."""
    view = memoryview(data).cast("B")
    if view.nbytes < _MAGIC_VERSION.size:
        raise ChunkFormatError(f"chunk shorter than its header ({view.nbytes} bytes)")
    magic, version = _MAGIC_VERSION.unpack(view[: _MAGIC_VERSION.size])
    if magic != MAGIC:
        raise ChunkFormatError(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise ChunkVersionError(f"chunk format version {version}, this kvpool reads {FORMAT_VERSION}")
    if view.nbytes < HEADER_SIZE:
        raise ChunkFormatError(f"chunk shorter than its header ({view.nbytes} bytes)")
    prefix = view[: _PREFIX.size]
    fields = _PREFIX.unpack(prefix)
    _magic, _version, layout, dtype, codec, ndim, _, *rest = fields
    dims, (token_count, _, payload_len, fingerprint, key) = rest[:MAX_DIMS], rest[MAX_DIMS:]
    if key != expected.key:
        raise ChunkFormatError("chunk belongs to another key")
    if fingerprint != expected.fingerprint:
        raise ChunkFormatError("chunk was computed by another model fingerprint")
    if layout != expected.layout or codec != expected.codec:
        raise ChunkFormatError(f"layout/codec {layout}/{codec} != {expected.layout}/{expected.codec}")
    if dtype != DTYPES.get(expected.dtype):
        raise ChunkFormatError(f"dtype code {dtype} != {expected.dtype}")
    if ndim > MAX_DIMS or tuple(dims[:ndim]) != tuple(expected.shape):
        raise ChunkFormatError(f"shape {tuple(dims[:ndim])} != {tuple(expected.shape)}")
    if token_count != expected.token_count:
        raise ChunkFormatError(f"token count {token_count} != {expected.token_count}")
    if payload_len != expected.payload_size or view.nbytes != HEADER_SIZE + payload_len:
        raise ChunkFormatError(f"payload length {view.nbytes - HEADER_SIZE} != {expected.payload_size}")
    if view[_FIELDS_END:HEADER_SIZE] != _ZEROS:
        raise ChunkFormatError("header padding is not zero")
    payload = view[HEADER_SIZE:]
    (stored,) = _CHECKSUM.unpack(view[_PREFIX.size : _FIELDS_END])
    if _checksum(prefix, payload) != stored:
        raise ChunkFormatError("checksum mismatch")
    return payload
