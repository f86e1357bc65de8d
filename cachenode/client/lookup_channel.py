"""The client end of the lookup service's lean query channel (rpc/lookupproto.py).

`QueryChannel` keeps a few idle connections to one service; a call takes one, sends its
request(s), reads the replies in order and gives it back. `pipeline` keeps several requests in
flight on one connection. Every reply is checked against its request before it is believed;
a connection that saw anything odd is closed, never reused.

Every call ends by its deadline (`timeout` from its start; in a pipeline, from each request's
turn to be answered), however slowly a service drips its reply (replystream.py), and a reply body
is read in pieces, so memory follows the bytes that arrived, not the length a header announced.

Errors: `InvalidRequest` for a query the service refused (as over gRPC); `ChannelDown` for
anything about the connection itself (refused, reset, timed out, bad token, malformed reply), on
which LookupClient answers the same query over gRPC instead.
"""

from __future__ import annotations

import collections
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from kvpool.cachenode.client.replystream import ReplyStream
from kvpool.cachenode.core.errors import InvalidRequest, KVPoolError
from kvpool.cachenode.rpc import lookupproto as lp

CONNECT_TIMEOUT_S = 1.0
READ_BUFFER = 64 * 1024
SOCKET_BUFFER = 1 << 20
MAX_IDLE = 8  # connections kept for the next calls (one per thread that asks at once)
MAX_INFLIGHT_BYTES = 256 * 1024  # request bytes sent but unanswered (both ends' buffers hold them)
BODY_PIECE = 1 << 20  # a reply body is read in pieces of this

T = TypeVar("T")
Decode = Callable[[lp.ReplyHeader, bytes], T]


class ChannelDown(KVPoolError):
    """The query channel failed (not the query): ask over gRPC instead."""


class QueryConnection:
    """One authenticated connection to a query channel."""

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.timeout = timeout
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((host, port), timeout=min(timeout, CONNECT_TIMEOUT_S))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            self.sock = sock
            self.reader = ReplyStream(sock, READ_BUFFER)
            self.reader.arm(deadline)
            sock.sendall(lp.encode_hello(token))
            status, _ = lp.STATUS_STRUCT.unpack(self._read(lp.STATUS_STRUCT.size))
            if status != lp.STATUS_OK:
                (length,) = lp.MSG_LEN.unpack(self._read(lp.MSG_LEN.size))
                message = self._read(min(length, lp.MAX_MESSAGE)).decode(errors="replace")
                raise ChannelDown(f"query channel refused the connection: {message}")
        except BaseException:
            sock.close()
            raise

    def _read(self, n: int) -> bytes:
        try:
            return self.reader.read_exact(n, BODY_PIECE)
        except ConnectionError:
            raise ConnectionError("the query channel closed mid-reply") from None

    def arm(self) -> None:
        """What is sent and read from now on ends within the timeout."""
        self.reader.arm(time.monotonic() + self.timeout)

    def check_drained(self) -> None:
        """After the last reply expected: more bytes mean a reply longer than it said."""
        if self.reader.leftover():
            raise lp.FrameError("the query channel sent more than its replies announced")

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def receive(self, asked: int, decode: Decode[T]) -> T:
        """Read the next reply (to a request of `asked` keys) and decode it."""
        head = lp.parse_reply(self._read(lp.REPLY.size), asked, lp.max_reply_body(asked))
        body = self._read(head.body_len)
        if head.status != lp.STATUS_OK:
            message = body.decode(errors="replace")
            if head.status == lp.STATUS_INVALID:
                raise InvalidRequest(message)
            raise ChannelDown(f"query channel: {message}")
        return decode(head, body)

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class QueryChannel:
    """Pooled connections to one service's query channel. Thread-safe."""

    def __init__(self, connect: Callable[[], QueryConnection], max_idle: int = MAX_IDLE) -> None:
        self._connect = connect
        self._max_idle = max_idle
        self._idle: collections.deque[QueryConnection] = collections.deque()  # atomic append/pop
        self.closed = False

    def adopt(self, conn: QueryConnection) -> None:
        """Keep a connection made elsewhere (the one that proved the channel reachable)."""
        self._give_back(conn)

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                return

    def call(self, frame: bytes, asked: int, decode: Decode[T]) -> T:
        """One request, one reply. A kept connection that turns out closed (the service dropped it
        while idle) is replaced once: queries change nothing, asking again is safe."""
        conn, kept = self._take()
        try:
            conn.arm()
            conn.send(frame)
            result = conn.receive(asked, decode)
            conn.check_drained()
        except BaseException as exc:
            conn.close()
            if not (kept and isinstance(exc, ConnectionError)):
                raise _down(exc) from None
            return self._call_once(self._new(), frame, asked, decode)
        self._give_back(conn)
        return result

    def _call_once(self, conn: QueryConnection, frame: bytes, asked: int, decode: Decode[T]) -> T:
        try:
            conn.arm()
            conn.send(frame)
            result = conn.receive(asked, decode)
            conn.check_drained()
        except BaseException as exc:
            conn.close()
            raise _down(exc) from None
        self._give_back(conn)
        return result

    def pipeline(self, requests: Iterable[tuple[bytes, int]], decode: Decode[T], window: int) -> Iterator[T]:
        """Replies to (frame, asked keys) requests in order, up to `window` requests in flight on
        one connection (and at most MAX_INFLIGHT_BYTES of them, so neither end blocks in a send
        while the other does too)."""
        conn, _ = self._take()
        inflight: collections.deque[tuple[int, int]] = collections.deque()  # (asked, frame bytes)
        sent_bytes = 0
        try:
            for frame, asked in requests:
                while inflight and (len(inflight) >= window or sent_bytes + len(frame) > MAX_INFLIGHT_BYTES):
                    done_asked, size = inflight.popleft()
                    sent_bytes -= size
                    conn.arm()
                    yield conn.receive(done_asked, decode)
                conn.arm()
                conn.send(frame)
                inflight.append((asked, len(frame)))
                sent_bytes += len(frame)
            while inflight:
                conn.arm()
                yield conn.receive(inflight.popleft()[0], decode)
            conn.check_drained()
        except GeneratorExit:  # the caller stopped early: replies are still on their way
            conn.close()
            raise
        except BaseException as exc:
            conn.close()
            raise _down(exc) from None
        self._give_back(conn)

    def _take(self) -> tuple[QueryConnection, bool]:
        """A kept connection (True) or a new one (False)."""
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                return self._new(), False
            try:
                conn.check_drained()  # bytes that came while it was idle answer nobody
                return conn, True
            except lp.FrameError:
                conn.close()

    def _new(self) -> QueryConnection:
        try:
            return self._connect()
        except (OSError, lp.FrameError, ValueError) as exc:
            raise ChannelDown(f"cannot connect to the query channel: {exc}") from None

    def _give_back(self, conn: QueryConnection) -> None:
        if self.closed or len(self._idle) >= self._max_idle:
            conn.close()
        else:
            self._idle.append(conn)


def _down(exc: BaseException) -> BaseException:
    """The error a failed call raises: the query's own errors as they are, the channel's as ChannelDown."""
    if isinstance(exc, InvalidRequest | ChannelDown) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, lp.FrameError):
        return ChannelDown(f"malformed query channel reply: {exc}")
    return ChannelDown(f"query channel: {exc}")
