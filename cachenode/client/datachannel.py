"""The client end of a node's lean TCP data channel: a few pooled connections, values received
straight into the caller's objects.

A `NodeConnection` (connection.py) learns the channel's port and session token with one Hello
call and hands them here; every reply is checked before it is believed (counts match the
request, sizes lie within the node's limits, no bytes beyond the reply), so a misbehaving node
is a `BadReply`, never a short or shifted value; and every call ends by its deadline (`timeout`
from the start of the call, however slowly the node drips its reply: replystream.py).
"""

from __future__ import annotations

import collections
import socket
import ssl
import time
from collections.abc import Callable, Sequence

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer
from kvpool.cachenode.client.control_ops import (
    ControlRequest,
    fits_one_window,
    pipelined,
    receive,
    send,
)
from kvpool.cachenode.client.replystream import ReplyStream
from kvpool.cachenode.core.errors import (
    BadReply,
    InvalidRequest,
    KVPoolError,
    NodeLeaving,
    Unauthenticated,
    Unavailable,
    Unreachable,
)
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb

READ_BUFFER = 256 * 1024
VALUE_PIECE = 64 * 1024 * 1024  # a larger value is read in pieces: memory follows the bytes that came
BUFFER_WAIT_S = 1.0

Value = bytes | bytearray | memoryview


def check_sizes(sizes: Sequence[int], count: int, limit: int, where: str) -> int:
    """Sizes of a get reply: one per key, each -1 (missing) or 0..limit; returns their sum."""
    if len(sizes) != count:
        raise BadReply(f"{where}: {len(sizes)} sizes for {count} keys")
    total = 0
    for size in sizes:
        if size < -1 or size > limit:
            raise BadReply(f"{where}: value size {size} outside -1..{limit}")
        if size > 0:
            total += size
    return total


def acquire_buffer(buffers: Callable[[], BufferPool], size: int) -> PooledBuffer:
    """A receive buffer of `size` bytes; Unavailable when the pool stays full (callers hold them)."""
    try:
        buf = buffers().acquire(size, timeout=BUFFER_WAIT_S)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if buf is None:
        raise Unavailable("receive buffers stayed full: release the buffers get_many_into returned")
    return buf


class DataConnection:
    """One authenticated socket of the data channel. Each call `arm`s it with its deadline."""

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        deadline: float | None = None,
    ) -> None:
        """`deadline` (time.monotonic): the handshake's, else `timeout` from now."""
        deadline = time.monotonic() + timeout if deadline is None else deadline
        sock = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 1e-3))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = tls.wrap_socket(sock, server_hostname=host) if tls is not None else sock
            self.reader = ReplyStream(self.sock, READ_BUFFER)
            self.reader.arm(deadline)
            self.sock.sendall(dp.encode_hello(token))
            self.features = self.read_status()  # FEATURE_* bits; 0 from nodes without control ops
        except BaseException:
            sock.close()
            raise

    def arm(self, deadline: float) -> None:
        """Every read and send of the next call ends by `deadline` (time.monotonic)."""
        self.reader.arm(deadline)

    def read_exact(self, n: int, piece: int = 0) -> bytes:
        try:
            return self.reader.read_exact(n, piece)
        except ConnectionError:
            raise ConnectionError("data channel closed mid-response") from None

    def read_into(self, view) -> int:
        return self.reader.readinto(view)

    def leftover(self) -> bool:
        """Whether the node sent bytes beyond the replies read (a lie, or a stale reply)."""
        return self.reader.leftover()

    def read_status(self) -> int:
        status, count = dp.STATUS_STRUCT.unpack(self.read_exact(dp.STATUS_STRUCT.size))
        if status != dp.STATUS_OK:
            (length,) = dp.MSG_LEN.unpack(self.read_exact(dp.MSG_LEN.size))
            message = self.read_exact(length).decode(errors="replace")
            if status == dp.STATUS_INVALID:
                raise InvalidRequest(message)
            if status == dp.STATUS_UNAUTHENTICATED:
                raise Unauthenticated(message)
            if status == dp.STATUS_LEAVING:
                raise NodeLeaving(message)
            raise Unavailable(f"data channel: {message}")
        return count

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class DataChannel:
    """The pooled data connections to one node. Thread-safe.

    `session()` is the node's current Hello (port, token, limits); `forget(hello)` drops it when
    the node turned out to have restarted (a new session token)."""

    def __init__(
        self,
        host: str,
        url: str,
        session: Callable[[], pb.HelloResponse],
        forget: Callable[[pb.HelloResponse], None],
        buffers: Callable[[], BufferPool],
        *,
        timeout: float,
        tls: ssl.SSLContext | None,
        max_idle: int,
    ) -> None:
        self._host = host
        self._url = url
        self._session = session
        self._forget = forget
        self._buffers = buffers
        self._timeout = timeout
        self._tls = tls
        self._max_idle = max_idle
        self._idle: collections.deque[DataConnection] = collections.deque()  # append/pop are atomic
        self._features: tuple[pb.HelloResponse, int] | None = None  # (session, its FEATURE_* bits)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.drop_idle()

    def drop_idle(self) -> None:
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                break

    # -- requests --------------------------------------------------------------------------
    def put(self, items: list[tuple[bytes, Value]]) -> None:
        self._with_connection(lambda conn: self._put(conn, items))

    def get(self, keys: list[bytes]) -> dict[bytes, bytes]:
        return self._with_connection(lambda conn: self._get(conn, keys))

    def get_into_pool(self, keys: list[bytes]) -> dict[bytes, PooledBuffer]:
        return self._with_connection(lambda conn: self._get_into_pool(conn, keys))

    def get_into(self, key: bytes, buffer) -> int | None:
        return self._with_connection(lambda conn: self._get_into(conn, key, buffer))

    # -- control ops: one round trip on a pooled connection, pipelined -------------------------
    def supports(self, feature: int = dp.FEATURE_CONTROL) -> bool:
        """Whether the server answers a FEATURE_* of ops, as its hello reply said (an old node:
        none); learned once per session (a restart, e.g. an upgrade, brings a new one)."""
        hello = self._session()
        known = self._features
        if known is None or known[0] is not hello:
            known = self._features = (hello, self._with_connection(lambda conn: conn.features))
        return bool(known[1] & feature)

    def pipeline(self, requests: Sequence[ControlRequest]) -> list:
        """The replies to `requests`, all exchanged on one connection (control_ops.pipelined);
        NoControlOps where the connection's server lacks an op's feature."""
        return self._with_connection(lambda conn: pipelined(conn, requests))

    def begin(self, requests: Sequence[ControlRequest]) -> Callable[[], list]:
        """Send `requests` now and return the function that reads their replies (call it once):
        one thread so has requests in flight on several nodes at once. Errors as `pipeline`'s,
        raised by the send or the read; a stale pooled connection is retried at the read."""
        if not fits_one_window(requests):
            return lambda: self.pipeline(requests)
        deadline = time.monotonic() + self._timeout
        conn, reused = self._acquire(deadline)
        try:
            conn.arm(deadline)
            send(conn, requests)
        except BaseException as exc:
            conn.close()
            if reused and _stale(exc):
                return lambda: self.pipeline(requests)
            raise self._control_failure(exc) from None

        def finish() -> list:
            try:
                replies = receive(conn, requests)
                self._check_drained(conn)
            except BaseException as exc:
                conn.close()
                if reused and _stale(exc):
                    return self.pipeline(requests)  # a fresh connection, as _with_connection would
                raise self._control_failure(exc) from None
            self._release(conn)
            return replies

        return finish

    def _control_failure(self, exc: BaseException) -> BaseException:
        """The error `_with_connection` would raise for `exc`."""
        where = f"data channel to {self._host}:{self._session().data_port}"
        if isinstance(exc, KVPoolError):
            return exc
        if isinstance(exc, TimeoutError):
            return Unreachable(f"{where}: {exc}")
        if isinstance(exc, OSError | ConnectionError):
            return Unavailable(f"{where} failed: {exc}")
        return exc

    # -- the pool of connections -----------------------------------------------------------
    def _with_connection(self, operation):
        """Run on a pooled connection; a stale pooled connection (closed by the node, e.g. after a
        restart) is retried once on a fresh one. A timeout is not retried: the node is slow or
        hung, and a second try would wait as long again. Both tries end by one deadline."""
        deadline = time.monotonic() + self._timeout
        for attempt in (0, 1):
            conn, reused = self._acquire(deadline)
            try:
                conn.arm(deadline)
                result = operation(conn)
                self._check_drained(conn)
            except KVPoolError:
                conn.close()
                raise
            except TimeoutError as exc:
                conn.close()
                raise Unreachable(
                    f"data channel to {self._host}:{self._session().data_port}: {exc}"
                ) from None
            except (OSError, ConnectionError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise Unavailable(
                    f"data channel to {self._host}:{self._session().data_port} failed: {exc}"
                ) from None
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    def _check_drained(self, conn: DataConnection) -> None:
        """After the last reply of a call: bytes beyond it mean the node framed a reply longer
        than it announced; what was read may be shifted, so the call fails (and drops `conn`)."""
        if conn.leftover():
            raise BadReply(f"{self._url}: the data channel sent more than its reply announced")

    def _acquire(self, deadline: float) -> tuple[DataConnection, bool]:
        if self.closed:
            raise Unavailable("client is closed")
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            if not conn.leftover():  # bytes that arrived while it was idle: never a reply to us
                return conn, True
            conn.close()
        for attempt in (0, 1):
            hello = self._session()
            host = hello.data_host or self._host
            try:
                conn = DataConnection(
                    host, hello.data_port, hello.data_token, self._timeout, self._tls, deadline
                )
            except Unauthenticated:
                if attempt:
                    raise
                self._forget(hello)  # the node restarted at this address: new session token
                continue
            except KVPoolError:
                raise
            except OSError as exc:
                raise Unreachable(f"cannot reach data channel {host}:{hello.data_port}: {exc}") from None
            self._features = (hello, conn.features)
            return conn, False
        raise AssertionError("unreachable")

    def _release(self, conn: DataConnection) -> None:
        if len(self._idle) < self._max_idle and not self.closed:
            self._idle.append(conn)
        else:
            conn.close()

    # -- one request on one connection -----------------------------------------------------
    def _put(self, conn: DataConnection, items: list[tuple[bytes, Value]]) -> None:
        views = [memoryview(v).cast("B") for _, v in items]
        header = dp.encode_put([(k, len(v)) for (k, _), v in zip(items, views, strict=True)])
        dp.send_buffers(conn.sock, [header, *views])
        stored = conn.read_status()
        if stored != len(items):
            raise BadReply(f"{self._url}: stored {stored} of {len(items)} values")

    def _read_sizes(self, conn: DataConnection, count: int) -> tuple[int, ...]:
        got = conn.read_status()
        if got != count:
            raise BadReply(f"{self._url}: {got} sizes for {count} keys")
        sizes = dp.parse_sizes(conn.read_exact(count * dp.SIZE.size), count)
        check_sizes(sizes, count, self._session().max_value_size, self._url)
        return sizes

    def _get_into_pool(self, conn: DataConnection, keys: list[bytes]) -> dict[bytes, PooledBuffer]:
        conn.sock.sendall(dp.encode_get(keys))
        sizes = self._read_sizes(conn, len(keys))
        found: dict[bytes, PooledBuffer] = {}
        try:
            for key, size in zip(keys, sizes, strict=True):
                if size >= 0:
                    found[key] = buf = acquire_buffer(self._buffers, size)  # an error drops the connection
                    if size and conn.read_into(buf.view) != size:
                        raise ConnectionError("data channel closed mid-value")
        except BaseException:
            for buf in found.values():
                buf.release()
            raise
        return found

    def _get(self, conn: DataConnection, keys: list[bytes]) -> dict[bytes, bytes]:
        conn.sock.sendall(dp.encode_get(keys))
        sizes = self._read_sizes(conn, len(keys))
        found: dict[bytes, bytes] = {}
        for key, size in zip(keys, sizes, strict=True):
            if size >= 0:  # size is within the node's --max-value-size, which the node announced
                found[key] = conn.read_exact(size, VALUE_PIECE)
        return found

    def _get_into(self, conn: DataConnection, key: bytes, buffer) -> int | None:
        conn.sock.sendall(dp.encode_get([key]))
        (size,) = self._read_sizes(conn, 1)
        if size < 0:
            return None
        view = memoryview(buffer).cast("B")
        if len(view) < size:  # the unread value stays on this connection, which is dropped with the error
            raise InvalidRequest(f"buffer of {len(view)} bytes is too small for a {size}-byte value")
        got = conn.read_into(view[:size])
        if got != size:
            raise ConnectionError("data channel closed mid-value")
        return size


def _stale(exc: BaseException) -> bool:
    """A pooled connection the node closed meanwhile (not a timeout: the node is slow)."""
    return isinstance(exc, OSError | ConnectionError) and not isinstance(exc, TimeoutError | KVPoolError)
