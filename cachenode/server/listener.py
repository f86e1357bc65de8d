"""A TCP listener that gives each connection a thread of its own: the node's data channel and the
lookup service's query channel.

Why a thread per connection: a client keeps a few connections and sends its requests one after
another on each, so the thread that reads a request answers it at once (no hand-off to a pool,
no per-call thread hop); the number of connections is bounded, and a client over the bound gets
the subclass's busy reply. Subclasses serve one connection in ``_serve``, call ``_proven`` once
its hello is accepted and ``_forget`` when it ends.

Why a deadline for the hello: a connection holds one of the bounded slots from the moment it is
accepted, so without one, anyone who can reach the port (no token needed) could hold every slot
by sending nothing, or a byte now and then, and lock out the clients that have the token. A
connection whose hello has not been accepted within ``HANDSHAKE_TIMEOUT_S`` of its accept (the TLS
handshake included) is cut.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

HANDSHAKE_TIMEOUT_S = 5.0  # from accept to an accepted hello, TLS included
_SWEEP_S = 0.25  # how often the accept loop looks for connections past their hello's deadline


class ConnectionListener:
    def __init__(self, host: str, port: int, *, name: str, max_connections: int) -> None:
        self._listener = socket.create_server((host, port), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._name = name
        self._max_connections = max_connections
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._hello_due: dict[socket.socket, float] = {}  # accepted, hello not yet accepted: its deadline
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
        self._listener.settimeout(_SWEEP_S)
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                self._cut_late_hellos()
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            conn.settimeout(None)  # accepted sockets inherit the listener's sweep timeout
            self._cut_late_hellos()
            with self._lock:
                busy = len(self._connections) >= self._max_connections
                if not busy:
                    self._connections.add(conn)
                    self._hello_due[conn] = time.monotonic() + HANDSHAKE_TIMEOUT_S
            if busy:
                with contextlib.suppress(OSError):
                    self._refuse(conn)
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer), name=f"{self._name}-conn", daemon=True
            ).start()

    def _cut_late_hellos(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [conn for conn, due in self._hello_due.items() if due <= now]
            for conn in late:
                del self._hello_due[conn]
        for conn in late:  # its thread's read then ends, and the thread forgets it
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if late:
            self._late_hello(len(late))

    def _late_hello(self, count: int) -> None:
        """Count connections cut for not saying hello in time (subclasses name the metric)."""

    def _proven(self, raw: socket.socket) -> None:
        """The connection accepted as ``raw`` said a valid hello: it may stay as long as it is used."""
        with self._lock:
            self._hello_due.pop(raw, None)

    def _forget(self, raw: socket.socket) -> None:
        """The connection accepted as ``raw`` has ended."""
        with self._lock:
            self._connections.discard(raw)
            self._hello_due.pop(raw, None)

    def _refuse(self, conn: socket.socket) -> None:
        """Tell a client over the connection bound that the server is busy (and count it)."""
        raise NotImplementedError

    def _serve(self, raw: socket.socket, peer) -> None:
        raise NotImplementedError
