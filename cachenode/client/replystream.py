"""Reading a server's replies on a client socket: every read of one call ends by one deadline,
and a reply that leaves bytes behind is noticed.

Why a deadline and not a socket timeout: a socket timeout bounds each recv, not a reply, so a
server that drips a byte just inside it would hold the caller for as long as it likes. Why count
what was read: a reply longer than it announced leaves bytes on the connection that the next
request would take for the start of its own reply; a connection in that state is never reused.
"""

from __future__ import annotations

import io
import socket
import ssl
import time


class DeadlineReader(io.RawIOBase):
    """Raw reads from a socket, each with the time left until `deadline` (None: the socket's own
    timeout); counts the bytes received."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline: float | None = None
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for the rest of the reply")
            self._sock.settimeout(left)
        n = self._sock.recv_into(buffer)
        self.received += n
        return n

    def waiting(self) -> bool:
        """Whether the server sent bytes that nobody read yet (True also for a broken socket)."""
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK through TLS: what it decrypted already
            return sock.pending() > 0
        sock.settimeout(0)  # a socket with a timeout would wait for data first; the next arm resets it
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))  # b"": closed, which is no data
        except BlockingIOError:
            return False
        except OSError:
            return True


class ReplyStream:
    """A buffered reader over `sock` for one call at a time: `arm` it, read, then ask `leftover`."""

    def __init__(self, sock: socket.socket, buffer_size: int) -> None:
        self._sock = sock
        self._raw = DeadlineReader(sock)
        self._file = io.BufferedReader(self._raw, buffer_size)
        self._consumed = 0

    def arm(self, deadline: float) -> None:
        """Every read and send until the next `arm` ends by `deadline` (time.monotonic)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out before the request was sent")
        self._raw.deadline = deadline
        self._sock.settimeout(left)  # sendall: the whole send within it

    def read_exact(self, n: int, piece: int = 0) -> bytes:
        """`n` bytes; with `piece`, read in pieces of at most that, so that memory grows with the
        bytes that arrived, not with a length the server announced."""
        if piece and n > piece:
            parts = []
            left = n
            while left:
                part = self._file.read(min(left, piece))
                if not part:
                    break
                parts.append(part)
                left -= len(part)
            data = b"".join(parts)
        else:
            data = self._file.read(n)
        self._consumed += len(data)
        if len(data) < n:
            raise ConnectionError("the connection closed mid-reply")
        return data

    def readinto(self, view) -> int:
        got = self._file.readinto(view) or 0
        self._consumed += got
        return got

    def leftover(self) -> bool:
        """Whether bytes arrived beyond what was read: after a complete reply, the server lied."""
        return self._raw.received > self._consumed or self._raw.waiting()

    def close(self) -> None:
        self._file.close()
