"""Framing of the lean TCP data channel (DESIGN.md §5); pure encode/parse, no sockets.

Connection:  client -> HELLO_STRUCT(magic, version, token_len) + token
             server -> STATUS_STRUCT(status, features) [+ error message]
Request:     REQUEST_STRUCT(op, flags, count, table_len) + entry table (+ PUT values back-to-back)
             entry = u8 key_len, [u64 size for PUT], key
Response:    STATUS_STRUCT(status, count) then for GET count x i64 sizes (-1 = missing) and the
             values back-to-back; on error status != 0 a u16 length and a UTF-8 message follow,
             and the server closes the connection. A stopping node answers puts with
             STATUS_LEAVING (after reading the values, so the client sees the status).

Control ops (PREFIX_HITS, CONTAINS, LEASE, RELEASE): the small lookup calls of the gRPC service,
answered by the connection's own thread in one round trip. Same request header; LEASE and
RELEASE tables start with fixed arguments (LEASE_ARGS u32 lease_ms, u64 lease_id; RELEASE_ARGS
u64 lease_id), then GET-style entries (RELEASE with count 0 = the whole lease). Replies:
PREFIX_HITS status(count = hits); LEASE status(count = hits) + u64 lease id; RELEASE
status(count = unpinned); CONTAINS status(count = keys) + one byte per key (1 = held).
A client may pipeline: send several requests, then read the replies, which come in order.
An agent also answers LOCATE (args and entries as LEASE; reply status(count) + LOCATE_REPLY u64
lease_id, u32 local) and UNPIN (as RELEASE): its Agent service's Locate and Unpin. Every length is
bounded before anything is read or allocated: count by max_batch_keys, table_len by what count
entries (plus the op's arguments) can fill, each key by MAX_KEY_SIZE; a reply is at most
5 + 12 + count bytes.

Negotiation: the version byte stays 1 (old nodes refuse any other). A node that knows the control
ops says so in the hello reply's count, a bit set of FEATURE_* (old nodes send 0): a client uses
the control ops only on connections whose hello reply has FEATURE_CONTROL (FEATURE_AGENT for
LOCATE/UNPIN), and gRPC otherwise, so a new client never sends an old node an op it would refuse.
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
OP_PREFIX_HITS = 4
OP_CONTAINS = 5
OP_LEASE = 6
OP_RELEASE = 7
OP_LOCATE = 8  # an agent's Locate: its arena, its peers and the pool
OP_UNPIN = 9  # an agent's Unpin
NODE_CONTROL_OPS = frozenset((OP_PREFIX_HITS, OP_CONTAINS, OP_LEASE, OP_RELEASE))
AGENT_OPS = frozenset((OP_LOCATE, OP_UNPIN))
CONTROL_OPS = NODE_CONTROL_OPS | AGENT_OPS
KNOWN_OPS = frozenset((OP_GET, OP_PUT, OP_PING)) | CONTROL_OPS

# The hello reply's count: what this server answers beyond GET/PUT/PING (older servers send 0).
FEATURE_CONTROL = 1  # PREFIX_HITS, CONTAINS, LEASE, RELEASE
FEATURE_AGENT = 2  # LOCATE, UNPIN (kvpool agent only)
FEATURES = FEATURE_CONTROL

LEASE_ARGS = struct.Struct("<IQ")  # lease_ms, lease_id (0: the node picks one)
RELEASE_ARGS = struct.Struct("<Q")  # lease_id
LEASE_ID = struct.Struct("<Q")
LOCATE_REPLY = struct.Struct("<QI")  # lease_id, of the count already in the agent's arena
OP_ARGS = {OP_LEASE: LEASE_ARGS, OP_RELEASE: RELEASE_ARGS, OP_LOCATE: LEASE_ARGS, OP_UNPIN: RELEASE_ARGS}

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


def encode_hello(token: bytes, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    """A hello: this channel's magic and version, then the session token (the lookup service's
    query channel shares the handshake under its own magic)."""
    if len(token) > MAX_TOKEN_LEN:
        raise FrameError("token too long")
    return HELLO_STRUCT.pack(magic, version, len(token)) + token


def parse_hello(
    header: bytes, magic: bytes = MAGIC, version: int = VERSION, channel: str = "data channel"
) -> int:
    """Return the token length that follows a hello header of `channel` (magic and version)."""
    got_magic, got_version, token_len = HELLO_STRUCT.unpack(header)
    if got_magic != magic:
        raise FrameError(f"not a kvpool {channel} (magic {got_magic!r})")
    if got_version != version:
        raise FrameError(f"unsupported {channel} version {got_version}")
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
    args = OP_ARGS.get(op)
    return count * per_entry + (args.size if args is not None else 0)


def parse_request_header(header: bytes, max_batch_keys: int) -> tuple[int, int, int]:
    """Validate a request header; returns (op, count, table_len)."""
    op, flags, count, table_len = REQUEST_STRUCT.unpack(header)
    if op not in KNOWN_OPS:
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


# -- control ops -------------------------------------------------------------------------------
_KEY_LEN = [bytes((n,)) for n in range(256)]  # a key's length byte, made once


def _keys_table(keys: Sequence[bytes]) -> bytes:
    """GET-style entries; keys are checked by the caller (1..64 bytes)."""
    parts: list[bytes] = []
    add = parts.append
    for key in keys:
        add(_KEY_LEN[len(key)])
        add(key)
    return b"".join(parts)


def encode_prefix_hits(keys: Sequence[bytes]) -> bytes:
    table = _keys_table(keys)
    return REQUEST_STRUCT.pack(OP_PREFIX_HITS, 0, len(keys), len(table)) + table


def encode_contains(keys: Sequence[bytes]) -> bytes:
    table = _keys_table(keys)
    return REQUEST_STRUCT.pack(OP_CONTAINS, 0, len(keys), len(table)) + table


def encode_lease(keys: Sequence[bytes], lease_ms: int, lease_id: int) -> bytes:
    table = LEASE_ARGS.pack(lease_ms, lease_id) + _keys_table(keys)
    return REQUEST_STRUCT.pack(OP_LEASE, 0, len(keys), len(table)) + table


def encode_release(lease_id: int, keys: Sequence[bytes], op: int = OP_RELEASE) -> bytes:
    """RELEASE (a node's lease) or UNPIN (an agent's)."""
    table = RELEASE_ARGS.pack(lease_id) + _keys_table(keys)
    return REQUEST_STRUCT.pack(op, 0, len(keys), len(table)) + table


def encode_locate(keys: Sequence[bytes], lease_ms: int, lease_id: int) -> bytes:
    table = LEASE_ARGS.pack(lease_ms, lease_id) + _keys_table(keys)
    return REQUEST_STRUCT.pack(OP_LOCATE, 0, len(keys), len(table)) + table


def parse_control(op: int, count: int, table: bytes) -> tuple[tuple[int, ...], list[bytes]]:
    """A control op's fixed arguments (empty for PREFIX_HITS/CONTAINS) and its keys."""
    args = OP_ARGS.get(op)
    values: tuple[int, ...] = ()
    pos = 0
    if args is not None:
        if len(table) < args.size:
            raise FrameError(f"op {op} needs {args.size} bytes of arguments, got {len(table)}")
        values = args.unpack_from(table)
        pos = args.size
    return values, parse_keys(table, count, pos)


def parse_keys(table: bytes, count: int, pos: int = 0) -> list[bytes]:
    """`count` GET-style entries from `pos` to the table's end (a lean loop: control ops are
    answered per lookup, so the parse is on every call's latency)."""
    keys: list[bytes] = []
    add = keys.append
    end = len(table)
    for _ in range(count):
        if pos >= end:
            raise FrameError("entry table is truncated")
        key_len = table[pos]
        if not 0 < key_len <= MAX_KEY_SIZE:
            raise FrameError(f"key must be 1..{MAX_KEY_SIZE} bytes, got {key_len}")
        pos += 1
        stop = pos + key_len
        if stop > end:
            raise FrameError("entry table is truncated")
        add(table[pos:stop])
        pos = stop
    if pos != end:
        raise FrameError("entry table has trailing bytes")
    return keys


def encode_flags(flags: Sequence[bool]) -> bytes:
    return bytes(1 if f else 0 for f in flags)


def parse_flags(data: bytes) -> list[bool]:
    if any(b > 1 for b in data):
        raise FrameError("contains flags must be 0 or 1")
    return [b == 1 for b in data]
