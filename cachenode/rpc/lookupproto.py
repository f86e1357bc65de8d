"""Framing of the lookup service's lean query channel; pure encode/parse, no sockets.

Locate and Scores without gRPC: one persistent TCP (or TLS) connection, one round trip per query,
and pipelining (a client may send several requests before reading; replies come in order).
The handshake is the data channel's (rpc/dataproto.py: the same hello and status structs) with
the lookup's own magic, so a client that dials a node's data port by mistake hears a clear error.

Connection:  client -> dataproto.HELLO_STRUCT(b"KVPL", 1, token_len) + token (the session token
             of the gRPC Hello, which the bearer token guards)
             server -> dataproto.STATUS_STRUCT(status, 0) [+ u16 length + UTF-8 message]
Request:     REQUEST(op, flags=0, key_size, kind, count, tokens_per_key) + count * key_size bytes
Reply:       REPLY(status, flags, entries, prefix, body_len) + body_len bytes
             LOCATE body: per holder ENTRY(run, info_len) + info + ceil(prefix / 8) bitmap bytes
             SCORES body: per holder SCORE(matched_keys, matched_tokens, info_len) + info
             info = INFO(kind code, id_len, tier_len, address_len) + id + tier + address (UTF-8)
             status != 0: the body is a UTF-8 message, and the server closes the connection.

Every length field is bounded before anything is read or allocated for it; a frame that breaks
the rules raises FrameError (the server answers STATUS_INVALID and closes the connection).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.located import HolderMatch, Located, Score
from kvpool.cachenode.core.record import MAX_KEY_SIZE
from kvpool.cachenode.rpc import dataproto
from kvpool.cachenode.rpc.dataproto import (
    HELLO_STRUCT,
    MSG_LEN,
    STATUS_INTERNAL,
    STATUS_INVALID,
    STATUS_OK,
    STATUS_STRUCT,
    STATUS_UNAUTHENTICATED,
    FrameError,
    encode_status,
)

__all__ = [
    "HELLO_STRUCT", "MSG_LEN", "STATUS_INTERNAL", "STATUS_INVALID", "STATUS_OK", "STATUS_STRUCT",
    "STATUS_UNAUTHENTICATED", "FrameError", "encode_status",
]  # fmt: skip

MAGIC = b"KVPL"
VERSION = 1
REQUEST = struct.Struct("<BBBBII")  # op, flags, key_size, kind code, count, tokens_per_key
REPLY = struct.Struct("<BBHII")  # status, flags, entries, prefix, body_len
ENTRY = struct.Struct("<IH")  # run, info_len
SCORE = struct.Struct("<IQH")  # matched_keys, matched_tokens, info_len
INFO = struct.Struct("<BHHH")  # kind code, holder_id len, tier len, address len (UTF-8 bytes)

OP_LOCATE = 1
OP_SCORES = 2
OPS = (OP_LOCATE, OP_SCORES)
FLAG_AUTHORITATIVE = 1

KINDS = ("", "agent", "node")  # kind code -> kind ("" = any, only in a Scores filter)
KIND_CODES = {kind: code for code, kind in enumerate(KINDS)}
MAX_QUERY_COUNT = 1_000_000  # the service's own --max-query-keys is at most this
MAX_ENTRIES = 65535  # holders in one reply (the service allows at most 65536 holders)
# A holder's fields as the service accepts them (253, 32 and 512 characters), UTF-8 encoded.
MAX_ID, MAX_TIER, MAX_ADDRESS = 4 * 253, 4 * 32, 4 * 512
MAX_INFO = INFO.size + MAX_ID + MAX_TIER + MAX_ADDRESS
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Request:
    op: int
    key_size: int
    kind: str
    count: int
    tokens_per_key: int

    @property
    def body_len(self) -> int:
        return self.count * self.key_size


# -- handshake (the data channel's structs, the lookup's magic) ---------------------------------
def encode_hello(token: bytes) -> bytes:
    return dataproto.encode_hello(token, MAGIC, VERSION)


def parse_hello(header: bytes) -> int:
    """The token length that follows a hello header."""
    return dataproto.parse_hello(header, MAGIC, VERSION, "lookup query channel")


# -- requests ------------------------------------------------------------------------------------
def pack_query(keys: Sequence[bytes]) -> tuple[int, bytes]:
    """(key size, keys back to back); every key of a query has one size of 1..64 bytes."""
    if not keys:
        return 32, b""
    size = len(keys[0])
    if not 1 <= size <= MAX_KEY_SIZE:
        raise ValueError(f"keys must be 1..{MAX_KEY_SIZE} bytes, got {size}")
    packed = b"".join(keys)
    if len(packed) != size * len(keys):
        raise ValueError("the keys of one query must all have the same size")
    return size, packed


def encode_locate(key_size: int, packed: bytes) -> bytes:
    return REQUEST.pack(OP_LOCATE, 0, key_size, 0, len(packed) // key_size, 0) + packed


def encode_scores(key_size: int, packed: bytes, tokens_per_key: int, kind: str) -> bytes:
    code = KIND_CODES.get(kind)
    if code is None:
        raise ValueError(f"kind must be agent, node or empty, got {kind!r}")
    count = len(packed) // key_size
    return REQUEST.pack(OP_SCORES, 0, key_size, code, count, tokens_per_key) + packed


def parse_request(header: bytes | memoryview, max_keys: int) -> Request:
    """Check a request header before its keys are read (FrameError for anything out of bounds)."""
    op, flags, key_size, kind, count, tokens_per_key = REQUEST.unpack(header)
    if op not in OPS:
        raise FrameError(f"unknown op {op}")
    if flags:
        raise FrameError(f"unknown flags {flags:#x}")
    if not 1 <= key_size <= MAX_KEY_SIZE:
        raise FrameError(f"key_size must be 1..{MAX_KEY_SIZE}, got {key_size}")
    if count > max_keys:
        raise FrameError(f"the query has {count} keys, the limit is {max_keys}")
    if kind >= len(KINDS):
        raise FrameError(f"unknown holder kind code {kind}")
    if op == OP_LOCATE and (kind or tokens_per_key):
        raise FrameError("a locate request carries no kind or tokens_per_key")
    return Request(op, key_size, KINDS[kind], count, tokens_per_key)


# -- replies ------------------------------------------------------------------------------------
def encode_info(info: HolderInfo) -> bytes:
    holder_id, tier, address = (s.encode() for s in (info.holder_id, info.tier, info.address))
    if len(holder_id) > MAX_ID or len(tier) > MAX_TIER or len(address) > MAX_ADDRESS:
        raise ValueError(f"holder {info.holder_id[:40]!r} does not fit a query reply")
    head = INFO.pack(KIND_CODES.get(info.kind, 0), len(holder_id), len(tier), len(address))
    return head + holder_id + tier + address


def encode_located(located: Located, info_bytes: Callable[[HolderInfo], bytes]) -> bytes:
    flags = FLAG_AUTHORITATIVE if located.authoritative else 0
    parts = []
    for m in located.holders:
        info = info_bytes(m.info)
        parts += (ENTRY.pack(m.run, len(info)), info, m.bitmap)
    body = b"".join(parts)
    return REPLY.pack(STATUS_OK, flags, len(located.holders), located.prefix, len(body)) + body


def encode_scores_reply(
    prefix: int, authoritative: bool, scores: Sequence[Score], info_bytes: Callable[[HolderInfo], bytes]
) -> bytes:
    flags = FLAG_AUTHORITATIVE if authoritative else 0
    parts = []
    for s in scores:
        info = info_bytes(s.info)
        parts += (SCORE.pack(s.matched_keys, s.matched_tokens, len(info)), info)
    body = b"".join(parts)
    return REPLY.pack(STATUS_OK, flags, len(scores), prefix, len(body)) + body


def encode_error(status: int, message: str) -> bytes:
    body = message.encode()[:MAX_MESSAGE]
    return REPLY.pack(status, 0, 0, 0, len(body)) + body


@dataclass(frozen=True)
class ReplyHeader:
    status: int
    authoritative: bool
    entries: int
    prefix: int
    body_len: int


def parse_reply(header: bytes, asked: int, max_body: int) -> ReplyHeader:
    """Check a reply header against the request it answers (`asked` keys)."""
    status, flags, entries, prefix, body_len = REPLY.unpack(header)
    if status != STATUS_OK:
        if body_len > MAX_MESSAGE:
            raise FrameError(f"error message of {body_len} bytes")
        return ReplyHeader(status, False, 0, 0, body_len)
    if flags & ~FLAG_AUTHORITATIVE:
        raise FrameError(f"unknown reply flags {flags:#x}")
    if prefix > asked:
        raise FrameError(f"prefix {prefix} of a query of {asked} keys")
    if body_len > max_body:
        raise FrameError(f"reply body of {body_len} bytes over {max_body}")
    return ReplyHeader(status, bool(flags & FLAG_AUTHORITATIVE), entries, prefix, body_len)


def max_reply_body(asked: int, entries: int = MAX_ENTRIES) -> int:
    """The largest body a reply to a query of `asked` keys may have."""
    return entries * (SCORE.size + MAX_INFO + (asked + 7) // 8)


class InfoCache:
    """Decoded holder infos by their bytes: a holder is decoded once, not on every reply."""

    def __init__(self, limit: int = 4096) -> None:
        self._infos: dict[bytes, HolderInfo] = {}
        self._limit = limit

    def get(self, blob: bytes) -> HolderInfo:
        info = self._infos.get(blob)
        if info is None:
            info = _parse_info(blob)
            if len(self._infos) >= self._limit:
                self._infos.clear()
            self._infos[blob] = info
        return info


def _parse_info(blob: bytes) -> HolderInfo:
    if len(blob) < INFO.size:
        raise FrameError("holder info is truncated")
    kind, id_len, tier_len, address_len = INFO.unpack_from(blob)
    if kind >= len(KINDS) or INFO.size + id_len + tier_len + address_len != len(blob):
        raise FrameError("holder info does not add up")
    if id_len > MAX_ID or tier_len > MAX_TIER or address_len > MAX_ADDRESS:
        raise FrameError("holder info fields over their limits")
    pos = INFO.size
    try:
        fields = []
        for n in (id_len, tier_len, address_len):
            fields.append(blob[pos : pos + n].decode())
            pos += n
    except UnicodeDecodeError:
        raise FrameError("holder info is not UTF-8") from None
    return HolderInfo(fields[0], KINDS[kind], fields[1], fields[2])


def decode_located(head: ReplyHeader, body: bytes, infos: InfoCache) -> Located:
    bitmap_len = (head.prefix + 7) // 8
    holders, pos, end = [], 0, len(body)
    for _ in range(head.entries):
        if pos + ENTRY.size > end:
            raise FrameError("locate reply is truncated")
        run, info_len = ENTRY.unpack_from(body, pos)
        pos += ENTRY.size
        if info_len > MAX_INFO or pos + info_len + bitmap_len > end:
            raise FrameError("locate reply entry does not fit the body")
        if run > head.prefix:
            raise FrameError(f"run {run} beyond the prefix {head.prefix}")
        info = infos.get(body[pos : pos + info_len])
        pos += info_len
        holders.append(HolderMatch(info, run, body[pos : pos + bitmap_len]))
        pos += bitmap_len
    if pos != end:
        raise FrameError("locate reply has trailing bytes")
    return Located(head.prefix, holders, head.authoritative)


def decode_scores(head: ReplyHeader, body: bytes, infos: InfoCache, tokens_per_key: int) -> list[Score]:
    out, pos, end = [], 0, len(body)
    for _ in range(head.entries):
        if pos + SCORE.size > end:
            raise FrameError("scores reply is truncated")
        matched_keys, matched_tokens, info_len = SCORE.unpack_from(body, pos)
        pos += SCORE.size
        if info_len > MAX_INFO or pos + info_len > end:
            raise FrameError("scores reply entry does not fit the body")
        if matched_keys > head.prefix or matched_tokens != matched_keys * tokens_per_key:
            raise FrameError("scores reply entry does not match the query")
        out.append(Score(infos.get(body[pos : pos + info_len]), matched_keys, matched_tokens))
        pos += info_len
    if pos != end:
        raise FrameError("scores reply has trailing bytes")
    return out
