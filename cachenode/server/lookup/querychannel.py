"""The lookup service's lean query channel: Locate and Scores over persistent TCP connections.

Python gRPC caps a unary service well below what the index answers (docs/lookup.md), so queries
also come in here, framed by rpc/lookupproto.py: one thread per connection reads the requests,
answers every complete one from the index itself (no hand-off to a worker pool), and sends the
replies of a pipelined burst with one send. Authentication is the gRPC side's: the session token
that Hello hands out (and the bearer token guards) opens a connection; TLS is the gRPC port's.

Any bad frame is answered with STATUS_INVALID and a one-line reason, and the connection is closed;
the listener and the other connections carry on.
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

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.fingerprint import fingerprints
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.rpc import lookupproto as lp
from kvpool.cachenode.server.listener import ConnectionListener
from kvpool.cachenode.server.lookup import metrics
from kvpool.cachenode.server.lookup.index import LookupIndex, scores

if TYPE_CHECKING:
    from kvpool.cachenode.rpc.tls import ServerTLS

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 600.0  # a quiet client keeps its connection this long
FRAME_TIMEOUT_S = 30.0  # a started frame must arrive within this
MAX_CONNECTIONS = 512
SOCKET_BUFFER = 1 << 20
READ_CHUNK = 256 * 1024
MIN_READ = 16 * 1024


class _Gone(Exception):
    """The peer closed the connection (possibly mid-frame) or stalled."""


class QueryChannel(ConnectionListener):
    """Accepts query-channel connections for one index; `check_scores(tokens_per_key, kind)`
    raises InvalidRequest for a Scores request the gRPC side would refuse."""

    def __init__(
        self,
        index: LookupIndex,
        host: str,
        port: int,
        *,
        token: bytes,
        max_query_keys: int,
        check_scores: Callable[[int, str], None],
        tls: ServerTLS | None = None,
    ) -> None:
        self._index = index
        self._token = token
        self._max_keys = max_query_keys
        self._check_scores = check_scores
        self._tls = tls
        self._infos: dict[HolderInfo, bytes] = {}
        super().__init__(host, port, name="kvpool-lookup-query", max_connections=MAX_CONNECTIONS)

    def _refuse(self, conn: socket.socket) -> None:
        conn.sendall(lp.encode_status(lp.STATUS_INTERNAL, 0, "too many query connections"))
        metrics.ERRORS.labels("query_busy").inc()

    def _late_hello(self, count: int) -> None:
        metrics.ERRORS.labels("query_late_hello").inc(count)

    # -- one connection --------------------------------------------------------------------
    def _serve(self, raw: socket.socket, peer) -> None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            raw.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        conn = raw
        try:
            raw.settimeout(FRAME_TIMEOUT_S)
            if self._tls is not None:
                conn = self._tls.context.wrap_socket(raw, server_side=True)
            if self._handshake(conn):
                self._proven(raw)
                self._answer(conn)
        except lp.FrameError as exc:
            metrics.ERRORS.labels("query_bad_frame").inc()
            log.warning("query channel: bad frame from %s: %s", peer[0], exc)
            self._reply(conn, lp.encode_error(lp.STATUS_INVALID, str(exc)))
        except InvalidRequest as exc:
            metrics.ERRORS.labels("invalid").inc()
            self._reply(conn, lp.encode_error(lp.STATUS_INVALID, str(exc)))
        except ssl.SSLError as exc:
            metrics.ERRORS.labels("query_tls").inc()
            log.warning("query channel: TLS with %s failed: %s", peer[0], exc)
        except (_Gone, TimeoutError, ConnectionError):
            pass  # the client went away; nothing to answer
        except OSError as exc:
            if not self._stopping.is_set():
                metrics.ERRORS.labels("query_io").inc()
                log.warning("query channel: I/O error with %s: %s", peer[0], exc)
        except Exception:  # a bug must not take the service down
            metrics.ERRORS.labels("query_internal").inc()
            log.exception("query channel: internal error serving %s", peer[0])
            self._reply(conn, lp.encode_error(lp.STATUS_INTERNAL, "internal error"))
        finally:
            self._forget(raw)
            with contextlib.suppress(OSError):
                conn.close()

    def _handshake(self, conn: socket.socket) -> bool:
        header = _recv_exact(conn, lp.HELLO_STRUCT.size)
        token = _recv_exact(conn, lp.parse_hello(header))
        if not hmac.compare_digest(token, self._token):
            metrics.ERRORS.labels("query_unauthenticated").inc()
            message = "bad query channel token: call Hello over gRPC (with the bearer token) for one"
            self._reply(conn, lp.encode_status(lp.STATUS_UNAUTHENTICATED, 0, message))
            return False
        conn.sendall(lp.encode_status(lp.STATUS_OK))
        return True

    def _answer(self, conn: socket.socket) -> None:
        """Read what arrived, answer every complete request in it, send those replies at once."""
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        start = end = 0
        header_size = lp.REQUEST.size
        while not self._stopping.is_set():
            replies: list[bytes] = []
            try:
                while end - start >= header_size:
                    request = lp.parse_request(view[start : start + header_size], self._max_keys)
                    frame_end = start + header_size + request.body_len
                    if frame_end > end:
                        break
                    replies.append(self._query(request, view[start + header_size : frame_end]))
                    start = frame_end
            finally:  # the requests before a bad one get their answers, then the error follows
                if replies:
                    conn.sendall(replies[0] if len(replies) == 1 else b"".join(replies))
            if start == end:
                start = end = 0
                if len(buf) > 4 * READ_CHUNK:  # a huge query grew it: give the memory back
                    view.release()
                    buf = bytearray(READ_CHUNK)
                    view = memoryview(buf)
            # the frame being read must fit from `start`, and a read needs room after `end`
            needed = header_size if end - start < header_size else header_size + request.body_len
            if start + needed > len(buf) or len(buf) - end < MIN_READ:
                view.release()
                buf[: end - start] = buf[start:end]
                start, end = 0, end - start
                if len(buf) < needed:
                    buf.extend(bytes(needed - len(buf)))
                view = memoryview(buf)
            conn.settimeout(IDLE_TIMEOUT_S if start == end else FRAME_TIMEOUT_S)
            got = conn.recv_into(view[end:])
            if not got:
                if start != end:
                    raise _Gone
                return
            end += got

    def _query(self, request: lp.Request, keys: memoryview) -> bytes:
        started = time.perf_counter()
        fps = fingerprints(keys, request.key_size)
        if request.op == lp.OP_LOCATE:
            located = self._index.locate(fps)
            reply = lp.encode_located(located, self._info)
            metrics.query_done("locate", started, request.count, located.prefix)
            return reply
        self._check_scores(request.tokens_per_key, request.kind)
        located = self._index.locate(fps)
        ranked = scores(located, request.tokens_per_key, request.kind)
        reply = lp.encode_scores_reply(located.prefix, located.authoritative, ranked, self._info)
        metrics.query_done("scores", started, request.count, located.prefix)
        return reply

    def _info(self, info: HolderInfo) -> bytes:
        blob = self._infos.get(info)
        if blob is None:
            if len(self._infos) > 4096:
                self._infos.clear()
            blob = self._infos[info] = lp.encode_info(info)
        return blob

    @staticmethod
    def _reply(conn: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise _Gone
        out += got
    return bytes(out)
