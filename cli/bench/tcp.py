"""The plain-socket baseline server of `kvpool bench node`, run in its own process.

The best-practice way to move the same bytes in Python: one connection, TCP_NODELAY, the sender
`sendall`s a preallocated buffer, the receiver `recv_into`s a preallocated buffer.
Request: 1 byte op ('G' or 'P') + u64 size. GET answers the first `size` bytes of the server's
buffer; PUT reads `size` bytes into it, then answers one acknowledgement byte. So the bytes a get
moves are those the last put sent: the bench puts its value, and checks what it gets back.
"""

from __future__ import annotations

import socket
import struct
import sys

REQUEST = struct.Struct("<cQ")


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def serve(max_size: int) -> None:
    buffer = memoryview(bytearray(max_size))
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = memoryview(bytearray(REQUEST.size))
        try:
            while True:
                recv_exact_into(conn, header)
                op, size = REQUEST.unpack(header)
                if op == b"G":
                    conn.sendall(buffer[:size])
                else:
                    recv_exact_into(conn, buffer[:size])
                    conn.sendall(b"k")
        except ConnectionError:
            conn.close()


class TcpBaselineClient:
    def __init__(self, port: int, max_size: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = memoryview(bytearray(max_size))
        self.ack = memoryview(bytearray(1))

    def get(self, size: int) -> memoryview:
        """The server's first `size` bytes, received into this client's one reused buffer."""
        self.sock.sendall(REQUEST.pack(b"G", size))
        view = self.buffer[:size]
        recv_exact_into(self.sock, view)
        return view

    def put(self, value: memoryview) -> int:
        """Send `value` (from the caller's memory, no copy); the bytes acknowledged."""
        self.sock.sendall(REQUEST.pack(b"P", value.nbytes))
        self.sock.sendall(value)
        recv_exact_into(self.sock, self.ack)
        return value.nbytes if self.ack == b"k" else 0

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
