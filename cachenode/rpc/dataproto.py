"""Framing of the lean TCP data channel (DESIGN.md §5); pure encode/parse, no sockets.

Connection:  client -> HELLO_STRUCT(magic, version, token_len) + token
             server -> STATUS_STRUCT(status, 0) [+ error message]
Request:     REQUEST_STRUCT(op, flags, count, table_len) + entry table (+ PUT values back-to-back)
             entry = u8 key_len, [u64 size for PUT], key
Response:    STATUS_STRUCT(status, count) then for GET count x i64 sizes (-1 = missing) and the
             values back-to-back; on error status != 0 a u16 length and a UTF-8 message follow,
             and the server closes the connection. A stopping node answers puts with
             STATUS_LEAVING (after reading the values, so the client sees the status).
"""

from __future__ import annotations

import ssl
import struct
from collections.abc import Sequence

from kvpool.cachenode.core.record import MAX_KEY_SIZE

MAGIC = b"KVPD"
VERSION = 1
HELLO_STRUCT = struct.Struct("<4sBH")
REQUEST_STRUCT = struct.Struct("<BBII")
STATUS_STRUCT = struct.Struct("<BI")
MSG_LEN = struct.Struct("<H")
SIZE = struct.Struct("<q")
MAX_TOKEN_LEN = 4096

OP_GET = 1
OP_PUT = 2
OP_PING = 3

STATUS_OK = 0
STATUS_INVALID = 1
STATUS_UNAUTHENTICATED = 2
STATUS_INTERNAL = 3
STATUS_BUSY = 4
STATUS_LEAVING = 5  # the node is handing its chunks over before it stops: put elsewhere


class FrameError(ValueError):
    """Bytes on the data channel do not follow the protocol."""


IOV_MAX = 1024


def send_buffers(sock, buffers) -> None:
    """Send several buffers with as few syscalls (and packets) as possible: one sendmsg for a
    header and its values instead of a sendall each, which costs a loopback round trip's worth."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    if isinstance(sock, ssl.SSLSocket):  # TLS sockets have no sendmsg
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent:
            first = len(views[0])
            if sent >= first:
                sent -= first
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def encode_hello(token: bytes) -> bytes:
    if len(token) > MAX_TOKEN_LEN:
        raise FrameError("token too long")
    return HELLO_STRUCT.pack(MAGIC, VERSION, len(token)) + token


def parse_hello(header: bytes) -> int:
    """Return the token length that follows a hello header."""
    magic, version, token_len = HELLO_STRUCT.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"not a kvpool data channel (magic {magic!r})")
    if version != VERSION:
        raise FrameError(f"unsupported data channel version {version}")
    if token_len > MAX_TOKEN_LEN:
        raise FrameError(f"token length {token_len} over {MAX_TOKEN_LEN}")
    return token_len


def encode_get(keys: Sequence[bytes]) -> bytes:
    table = b"".join(bytes((len(k),)) + k for k in keys)
    return REQUEST_STRUCT.pack(OP_GET, 0, len(keys), len(table)) + table


def encode_put(entries: Sequence[tuple[bytes, int]]) -> bytes:
    table = b"".join(struct.pack("<BQ", len(k), size) + k for k, size in entries)
    return REQUEST_STRUCT.pack(OP_PUT, 0, len(entries), len(table)) + table


def encode_ping() -> bytes:
    return REQUEST_STRUCT.pack(OP_PING, 0, 0, 0)


def max_table_len(op: int, count: int) -> int:
    per_entry = 1 + MAX_KEY_SIZE + (8 if op == OP_PUT else 0)
    return count * per_entry


def parse_request_header(header: bytes, max_batch_keys: int) -> tuple[int, int, int]:
    """Validate a request header; returns (op, count, table_len)."""
    op, flags, count, table_len = REQUEST_STRUCT.unpack(header)
    if op not in (OP_GET, OP_PUT, OP_PING):
        raise FrameError(f"unknown op {op}")
    if flags != 0:
        raise FrameError(f"unknown flags {flags:#x}")
    if count > max_batch_keys:
        raise FrameError(f"batch has {count} keys, the limit is {max_batch_keys}")
    if table_len > max_table_len(op, count):
        raise FrameError(f"entry table of {table_len} bytes is too long for {count} keys")
    return op, count, table_len


def parse_table(op: int, count: int, table: bytes) -> list[tuple[bytes, int]]:
    """Parse the entry table; sizes are -1 for GET entries."""
    entries: list[tuple[bytes, int]] = []
    pos = 0
    end = len(table)
    for _ in range(count):
        if pos >= end:
            raise FrameError("entry table is truncated")
        key_len = table[pos]
        pos += 1
        size = -1
        if op == OP_PUT:
            if pos + 8 > end:
                raise FrameError("entry table is truncated")
            (size,) = struct.unpack_from("<Q", table, pos)
            pos += 8
        if not 0 < key_len <= MAX_KEY_SIZE:
            raise FrameError(f"key must be 1..{MAX_KEY_SIZE} bytes, got {key_len}")
        if pos + key_len > end:
            raise FrameError("entry table is truncated")
        entries.append((bytes(table[pos : pos + key_len]), size))
        pos += key_len
    if pos != end:
        raise FrameError("entry table has trailing bytes")
    return entries


def encode_status(status: int, count: int = 0, message: str = "") -> bytes:
    out = STATUS_STRUCT.pack(status, count)
    if status != STATUS_OK:
        msg = message.encode()[:1024]
        out += MSG_LEN.pack(len(msg)) + msg
    return out


def encode_sizes(sizes: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(sizes)}q", *sizes)


def parse_sizes(data: bytes, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}q", data)
