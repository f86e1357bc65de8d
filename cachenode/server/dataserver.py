"""The node side of the lean TCP data channel: one thread per connection, bytes received
straight into L1 arena ranges that get stored as they are, values sent from the stored ranges
(whose memoryviews keep them alive until sent; see tiers/arena_memory.py).

A put becomes visible only after every byte of the request arrived; a cut-off request stores
nothing. Any protocol error answers with a status and closes the connection. Control ops (prefix
hits, leases, contains) are answered on the connection's own thread by control.py, the logic the
gRPC service uses, in the order they arrived (clients may pipeline them).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.validation import check_value_size
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.server import control
from kvpool.cachenode.server.listener import ConnectionListener
from kvpool.cachenode.server.tiers.memory import drain

if TYPE_CHECKING:
    from kvpool.cachenode.rpc.tls import ServerTLS
    from kvpool.cachenode.server.tiers.store import TieredStore

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 300.0
TRANSFER_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 256
READ_BUFFER = 256 * 1024

# Label children resolved once: .labels() costs a lock and a dict lookup on every request.
_GET_REQUESTS = metrics.REQUESTS.labels("get", "data")
_PUT_REQUESTS = metrics.REQUESTS.labels("put", "data")
_BYTES_OUT = metrics.BYTES_OUT.labels("data")
_BYTES_IN = metrics.BYTES_IN.labels("data")
_GET_LATENCY = metrics.LATENCY.labels("get")
_PUT_LATENCY = metrics.LATENCY.labels("put")


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY: small headers must not wait for Nagle behind bulk data."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _ClientGone(Exception):
    """The peer closed the connection or stalled mid-request."""


class _Refused(Exception):
    """A put the node will not take (it is leaving); the message says why."""


DRAIN_CHUNK = 1024 * 1024


def _read_into(conn: socket.socket, rfile, view: memoryview) -> None:
    """Fill `view`: first what `rfile` read ahead with the request's header, then straight from
    the socket. One `readinto1` empties the reader's buffer unless it fills the view (a raw read it
    makes goes into the view, or into an empty buffer that it then copies out up to the view's
    end), so the rest can bypass the reader: no second copy of the value's tail through the
    reader's buffer, and no Python-level wrapper per socket read."""
    if not view:
        return
    got = rfile.readinto1(view)
    while got:
        view = view[got:]
        if not view:
            return
        got = conn.recv_into(view)
    raise _ClientGone


class DataServer(ConnectionListener):
    """Accepts data-channel connections for one store."""

    def __init__(
        self,
        store: TieredStore,
        host: str,
        port: int,
        *,
        token: bytes,
        max_value_size: int,
        max_batch_keys: int,
        max_request_bytes: int,
        tls: ServerTLS | None = None,
        refuse_puts: Callable[[], str | None] = lambda: None,
    ) -> None:
        """`refuse_puts`: a reason to refuse puts now (the node is leaving), or None."""
        self._tls = tls
        self._refuse_puts = refuse_puts
        self._store = store
        self.agent: control.Locator | None = None  # an agent's own lookups: LOCATE and UNPIN
        self._token = token
        self._max_value_size = max_value_size
        self._max_batch_keys = max_batch_keys
        self._max_request_bytes = max_request_bytes
        super().__init__(host, port, name="kvpool-data", max_connections=MAX_CONNECTIONS)

    def _refuse(self, conn: socket.socket) -> None:
        conn.sendall(dp.encode_status(dp.STATUS_BUSY, 0, "too many data connections"))
        metrics.ERRORS.labels("data_busy").inc()

    def _late_hello(self, count: int) -> None:
        metrics.ERRORS.labels("data_late_hello").inc(count)

    def _serve(self, raw: socket.socket, peer) -> None:
        tune_socket(raw)
        conn = raw
        if self._tls is not None:
            try:
                raw.settimeout(TRANSFER_TIMEOUT_S)
                conn = self._tls.context.wrap_socket(raw, server_side=True)  # the pair in use now
            except (OSError, ssl.SSLError) as exc:
                metrics.ERRORS.labels("data_tls").inc()
                log.warning("data channel: TLS handshake with %s failed: %s", peer[0], exc)
                self._forget(raw)
                raw.close()
                return
        rfile = conn.makefile("rb", buffering=READ_BUFFER)
        try:
            conn.settimeout(TRANSFER_TIMEOUT_S)
            if not self._handshake(conn, rfile):
                return
            self._proven(raw)
            while not self._stopping.is_set():
                conn.settimeout(IDLE_TIMEOUT_S)
                header = rfile.read(dp.REQUEST_STRUCT.size)
                if not header:
                    return  # clean close between requests
                conn.settimeout(TRANSFER_TIMEOUT_S)
                if len(header) < dp.REQUEST_STRUCT.size:
                    raise _ClientGone
                self._handle(conn, rfile, header)
        except dp.FrameError as exc:
            metrics.ERRORS.labels("data_bad_frame").inc()
            log.warning("data channel: bad frame from %s: %s", peer[0], exc)
            self._reply_error(conn, dp.STATUS_INVALID, str(exc))
        except InvalidRequest as exc:
            metrics.ERRORS.labels("data_invalid").inc()
            self._reply_error(conn, dp.STATUS_INVALID, str(exc))
        except _Refused as exc:
            self._reply_error(conn, dp.STATUS_LEAVING, str(exc))
        except (_ClientGone, TimeoutError, ConnectionError):
            metrics.ERRORS.labels("data_disconnect").inc()
        except OSError as exc:
            if not self._stopping.is_set():
                metrics.ERRORS.labels("data_io").inc()
                log.warning("data channel: I/O error with %s: %s", peer[0], exc)
        except Exception:  # a bug must not take the node down
            metrics.ERRORS.labels("data_internal").inc()
            log.exception("data channel: internal error serving %s", peer[0])
            self._reply_error(conn, dp.STATUS_INTERNAL, "internal error")
        finally:
            self._forget(raw)
            rfile.close()
            conn.close()

    def _handshake(self, conn: socket.socket, rfile) -> bool:
        header = rfile.read(dp.HELLO_STRUCT.size)
        if len(header) < dp.HELLO_STRUCT.size:
            raise _ClientGone
        token = rfile.read(dp.parse_hello(header))
        if not hmac.compare_digest(token, self._token):
            metrics.ERRORS.labels("data_unauthenticated").inc()
            self._reply_error(conn, dp.STATUS_UNAUTHENTICATED, "bad data channel token; call Hello over gRPC")
            return False
        features = dp.FEATURES | (dp.FEATURE_AGENT if self.agent is not None else 0)
        conn.sendall(dp.encode_status(dp.STATUS_OK, features))  # count: what this server answers
        return True

    def _handle(self, conn: socket.socket, rfile, header: bytes) -> None:
        op, count, table_len = dp.parse_request_header(header, self._max_batch_keys)
        table = rfile.read(table_len)
        if len(table) < table_len:
            raise _ClientGone
        if op in dp.CONTROL_OPS:
            conn.sendall(self._control(op, count, table))
            return
        entries = dp.parse_table(op, count, table)
        if op == dp.OP_PING:
            conn.sendall(dp.encode_status(dp.STATUS_OK))
        elif op == dp.OP_GET:
            self._get(conn, [key for key, _ in entries])
        else:
            self._put(conn, rfile, entries)

    def _control(self, op: int, count: int, table: bytes) -> bytes:
        """A control op answered on this connection's thread (no hop to a worker): the reply."""
        args, keys = dp.parse_control(op, count, table)
        if op == dp.OP_PREFIX_HITS:
            hits, _ = control.prefix_hits(self._store, keys, 0, 0, "data")
            return dp.encode_status(dp.STATUS_OK, hits)
        if op == dp.OP_LEASE:
            lease_ms, lease_id = args
            hits, lease_id = control.prefix_hits(self._store, keys, lease_ms, lease_id, "data")
            return dp.encode_status(dp.STATUS_OK, hits) + dp.LEASE_ID.pack(lease_id)
        if op == dp.OP_RELEASE:
            (lease_id,) = args
            released = control.release(self._store, lease_id, keys or None, "data")
            return dp.encode_status(dp.STATUS_OK, released)
        if op in dp.AGENT_OPS:
            return self._agent_control(op, args, keys)
        flags = control.contains(self._store, keys, "data")
        return dp.encode_status(dp.STATUS_OK, len(flags)) + dp.encode_flags(flags)

    def _agent_control(self, op: int, args: tuple[int, ...], keys: list[bytes]) -> bytes:
        if self.agent is None:
            raise dp.FrameError(f"op {op} is an agent's; this is a cache node")
        if op == dp.OP_LOCATE:
            lease_ms, lease_id = args
            hits, lease_id, local = control.locate(self.agent, keys, lease_ms, lease_id, "data")
            return dp.encode_status(dp.STATUS_OK, hits) + dp.LOCATE_REPLY.pack(lease_id, local)
        (lease_id,) = args
        return dp.encode_status(dp.STATUS_OK, control.unpin(self.agent, lease_id, keys or None, "data"))

    def _get(self, conn: socket.socket, keys: list[bytes]) -> None:
        started = time.perf_counter()
        values = self._store.get_many(keys)
        sizes = [-1 if v is None else memoryview(v).nbytes for v in values]
        header = dp.encode_status(dp.STATUS_OK, len(keys)) + dp.encode_sizes(sizes)
        found = [v for v in values if v is not None]
        dp.send_buffers(conn, [header, *found])
        _GET_REQUESTS.inc()
        metrics.REQUESTED_KEYS.inc(len(keys))
        metrics.HIT_KEYS.inc(len(found))
        _BYTES_OUT.inc(sum(s for s in sizes if s > 0))
        _GET_LATENCY.observe(time.perf_counter() - started)

    def _put(self, conn: socket.socket, rfile, entries: list[tuple[bytes, int]]) -> None:
        started = time.perf_counter()
        total = 0
        for _, size in entries:
            check_value_size(size, self._max_value_size)
            total += size
        if total > self._max_request_bytes:
            raise InvalidRequest(
                f"put of {total} bytes exceeds the node's limit of {self._max_request_bytes}"
            )
        refused = self._refuse_puts()
        if refused:
            self._drain(rfile, total)  # read it all, so the client gets the status, not a reset
            raise _Refused(refused)
        items: list[tuple[bytes, object]] = []
        for key, size in entries:
            # Straight into an L1 range, which the store then keeps without a copy; a heap buffer
            # only when L1 has no room now (the store then decides where the value goes).
            value = self._store.allocate(size)
            if value is None:
                value = bytearray(size)
                metrics.ERRORS.labels("data_put_outside_arena").inc()
            _read_into(conn, rfile, memoryview(value).cast("B"))  # cut off: nothing becomes visible
            items.append((key, value))
        count = len(items)
        self._store.put_many(drain(items))
        conn.sendall(dp.encode_status(dp.STATUS_OK, count))
        _PUT_REQUESTS.inc()
        _BYTES_IN.inc(total)
        _PUT_LATENCY.observe(time.perf_counter() - started)

    @staticmethod
    def _drain(rfile, total: int) -> None:
        scratch = memoryview(bytearray(min(total, DRAIN_CHUNK)))
        while total > 0:
            got = rfile.readinto(scratch[: min(total, len(scratch))])
            if not got:
                raise _ClientGone
            total -= got

    @staticmethod
    def _reply_error(conn: socket.socket, status: int, message: str) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(dp.encode_status(status, 0, message))
