"""A TCP listener that gives each connection a thread of its own: the node's data channel and the
lookup service's query channel.

Why a thread per connection: a client keeps a few connections and sends its requests one after
another on each, so the thread that reads a request answers it at once (no hand-off to a pool,
no per-call thread hop); the number of connections is bounded, and a client over the bound gets
the subclass's busy reply. Subclasses serve one connection in ``_serve`` and call ``_forget``
when it ends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class ConnectionListener:
    def __init__(self, host: str, port: int, *, name: str, max_connections: int) -> None:
        self._listener = socket.create_server((host, port), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._name = name
        self._max_connections = max_connections
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and cut every open connection (their threads then end)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    @property
    def connections(self) -> int:
        return len(self._connections)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            with self._lock:
                busy = len(self._connections) >= self._max_connections
                if not busy:
                    self._connections.add(conn)
            if busy:
                with contextlib.suppress(OSError):
                    self._refuse(conn)
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer), name=f"{self._name}-conn", daemon=True
            ).start()

    def _forget(self, raw: socket.socket) -> None:
        """The connection accepted as ``raw`` has ended."""
        with self._lock:
            self._connections.discard(raw)

    def _refuse(self, conn: socket.socket) -> None:
        """Tell a client over the connection bound that the server is busy (and count it)."""
        raise NotImplementedError

    def _serve(self, raw: socket.socket, peer) -> None:
        raise NotImplementedError
