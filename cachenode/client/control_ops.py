"""The data channel's control ops on the client side: encoded requests, checked replies, and the
pipelined exchange on one connection (requests sent in windows, replies read in order).

Every reply is checked against its request (a prefix no longer than the keys asked, one flag per
key), so a misbehaving server is a `BadReply`, never a wrong count handed to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kvpool.cachenode.core.errors import BadReply
from kvpool.cachenode.rpc import dataproto as dp

PIPELINE_REPLY_BYTES = 64 * 1024  # replies in flight per window: well under any socket buffer

# NodeConnection's methods that have a control op, by name.
CALLS = {
    "prefix_hits": dp.OP_PREFIX_HITS,
    "contains": dp.OP_CONTAINS,
    "lease_prefix": dp.OP_LEASE,
    "release": dp.OP_RELEASE,
}


class NoControlOps(Exception):
    """This server's data channel predates the op (its hello reply lacks the feature): ask over
    gRPC."""


class Connection(Protocol):
    """What a control exchange needs of a data connection (datachannel.DataConnection)."""

    features: int
    sock: object

    def read_status(self) -> int: ...
    def read_exact(self, n: int) -> bytes: ...


class ControlRequest:
    """One encoded control op, the hello feature it needs, and how to read (and check) its reply."""

    __slots__ = ("feature", "frame", "read", "reply_bytes")

    def __init__(
        self, frame: bytes, read: Callable[[Connection], object], reply_bytes: int, feature: int
    ) -> None:
        self.frame = frame
        self.read = read
        self.reply_bytes = reply_bytes
        self.feature = feature


def control_request(op: int, keys: Sequence[bytes], where: str, *args: int) -> ControlRequest:
    """The request for a control op on checked keys; its reader checks the reply against it.
    `args`: LEASE and LOCATE lease_ms, lease_id; RELEASE and UNPIN lease_id."""
    n = len(keys)
    status = dp.STATUS_STRUCT.size

    def read_hits(conn: Connection) -> int:
        hits = conn.read_status()
        if hits > n:
            raise BadReply(f"{where}: prefix of {hits} hits for {n} keys")
        return hits

    def read_lease(conn: Connection) -> tuple[int, int]:
        hits = read_hits(conn)
        (lease_id,) = dp.LEASE_ID.unpack(conn.read_exact(dp.LEASE_ID.size))
        return hits, lease_id

    def read_located(conn: Connection) -> tuple[int, int, int]:
        hits = read_hits(conn)
        lease_id, local = dp.LOCATE_REPLY.unpack(conn.read_exact(dp.LOCATE_REPLY.size))
        if local > hits:
            raise BadReply(f"{where}: {local} of {hits} hits in the arena")
        return hits, lease_id, local

    def read_flags(conn: Connection) -> list[bool]:
        got = conn.read_status()
        if got != n:
            raise BadReply(f"{where}: {got} flags for {n} keys")
        try:
            return dp.parse_flags(conn.read_exact(n))
        except dp.FrameError as exc:
            raise BadReply(f"{where}: {exc}") from None

    def read_count(conn: Connection) -> int:
        return conn.read_status()

    control, agent = dp.FEATURE_CONTROL, dp.FEATURE_AGENT
    if op == dp.OP_PREFIX_HITS:
        return ControlRequest(dp.encode_prefix_hits(keys), read_hits, status, control)
    if op == dp.OP_CONTAINS:
        return ControlRequest(dp.encode_contains(keys), read_flags, status + n, control)
    if op == dp.OP_LEASE:
        return ControlRequest(dp.encode_lease(keys, *args), read_lease, status + dp.LEASE_ID.size, control)
    if op == dp.OP_RELEASE:
        return ControlRequest(dp.encode_release(*args, keys), read_count, status, control)
    if op == dp.OP_LOCATE:
        frame = dp.encode_locate(keys, *args)
        return ControlRequest(frame, read_located, status + dp.LOCATE_REPLY.size, agent)
    if op == dp.OP_UNPIN:
        return ControlRequest(dp.encode_release(*args, keys, op=dp.OP_UNPIN), read_count, status, agent)
    raise ValueError(f"op {op} is not a control op")


def fits_one_window(requests: Sequence[ControlRequest]) -> bool:
    return sum(r.reply_bytes for r in requests) <= PIPELINE_REPLY_BYTES


def send(conn: Connection, requests: Sequence[ControlRequest]) -> None:
    """Send requests whose replies fit one window (`fits_one_window`); read them with `receive`."""
    _check_features(conn, requests)
    dp.send_buffers(conn.sock, [r.frame for r in requests])


def receive(conn: Connection, requests: Sequence[ControlRequest]) -> list:
    return [r.read(conn) for r in requests]


def _check_features(conn: Connection, requests: Sequence[ControlRequest]) -> None:
    for request in requests:
        if not conn.features & request.feature:  # e.g. the node was replaced by an older one
            raise NoControlOps("this data channel does not answer the control op")


def pipelined(conn: Connection, requests: Sequence[ControlRequest]) -> list:
    """Send the requests in windows whose replies fit the socket buffers (so neither end blocks
    sending while the other does) and read the replies, in order."""
    _check_features(conn, requests)
    replies: list = []
    start = 0
    while start < len(requests):
        end, pending = start, 0
        while end < len(requests) and (
            end == start or pending + requests[end].reply_bytes <= PIPELINE_REPLY_BYTES
        ):
            pending += requests[end].reply_bytes
            end += 1
        dp.send_buffers(conn.sock, [r.frame for r in requests[start:end]])
        replies.extend(r.read(conn) for r in requests[start:end])
        start = end
    return replies
