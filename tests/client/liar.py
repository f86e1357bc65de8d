"""A node that lies: a real gRPC Hello and a real TCP data channel (framed with rpc/dataproto's
encoders) whose answers each test scripts. A real node cannot be made to lie; this one can."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from concurrent import futures

import grpc

from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc

MAX_VALUE = 1 << 20
TOKEN = b"liar-token"

# answer(sock, op, entries, values) writes whatever the test wants; False closes the connection
Answer = Callable[[socket.socket, int, list, list], "bool | None"]


class _Hello(pb_grpc.CacheNodeServicer):
    def __init__(self, data_port: int, max_value_size: int) -> None:
        self.data_port = data_port
        self.max_value_size = max_value_size

    def Hello(self, request, context):
        return pb.HelloResponse(
            node_id="liar", data_port=self.data_port, data_token=TOKEN, max_value_size=self.max_value_size,
            max_batch_keys=64, max_frame_size=4 << 20,
        )  # fmt: skip

    def Members(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "no members here")


class LyingServer:
    """What every lying server shares: a real gRPC server for its Hello (``add_servicer(server,
    tcp_port)`` registers it) and a TCP listener whose connections ``_serve`` answers."""

    def __init__(self, add_servicer: Callable[[grpc.Server, int], None], workers: int = 4) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.data_port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._grpc = grpc.server(futures.ThreadPoolExecutor(workers))
        add_servicer(self._grpc, self.data_port)
        self.port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._grpc.stop(0)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


class LyingNode(LyingServer):
    """`answer` is called for every request read off a data connection (after a proper hello);
    it may be swapped at any time."""

    def __init__(
        self, answer: Answer, features: int = dp.FEATURE_CONTROL, max_value_size: int = MAX_VALUE
    ) -> None:
        self.answer = answer
        self.features = features
        self.requests = 0
        super().__init__(
            lambda server, port: pb_grpc.add_CacheNodeServicer_to_server(_Hello(port, max_value_size), server)
        )

    def _serve(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        try:
            _, _, token_len = dp.HELLO_STRUCT.unpack(f.read(dp.HELLO_STRUCT.size))
            f.read(token_len)
            conn.sendall(dp.encode_status(dp.STATUS_OK, self.features))
            while True:
                header = f.read(dp.REQUEST_STRUCT.size)
                if len(header) < dp.REQUEST_STRUCT.size:
                    return
                op, _, count, table_len = dp.REQUEST_STRUCT.unpack(header)
                table = f.read(table_len)
                if op in dp.CONTROL_OPS:
                    entries = [(k, -1) for k in dp.parse_control(op, count, table)[1]]
                else:
                    entries = dp.parse_table(op, count, table)
                values = [f.read(size) for _, size in entries] if op == dp.OP_PUT else []
                self.requests += 1
                if self.answer(conn, op, entries, values) is False:
                    return
        except (OSError, ValueError):
            return
        finally:
            f.close()
            with contextlib.suppress(OSError):
                conn.close()


def get_reply(sizes: list[int], values: list[bytes]) -> bytes:
    """A GET reply as a node frames it (sizes may lie about the values)."""
    return dp.encode_status(dp.STATUS_OK, len(sizes)) + dp.encode_sizes(sizes) + b"".join(values)
