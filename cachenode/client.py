"""`Client`: the Python API of a kvpool pool (node, agent or `kvpool up`).

Control calls go over gRPC; values travel on the node's lean TCP data channel (learned with one
Hello call), received straight into the result objects; the ≤ 4 MiB-frame gRPC stream is the
fallback when the data channel is off or unreachable.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlparse

import grpc

from . import dataproto as dp
from .errors import InvalidRequest, KVPoolError, Unauthenticated, Unavailable
from .grpcframes import split_into_frames
from .proto import kvpool_pb2 as pb
from .proto import kvpool_pb2_grpc as pb_grpc
from .settings import MAX_FRAME_SIZE
from .tls import client_context, read_ca
from .validation import check_key, check_value_size

DEFAULT_TIMEOUT_S = 10.0
DATA_CONNECTIONS = 4
READ_BUFFER = 256 * 1024
MAX_REQUEST_BYTES = 256 * 1024 * 1024
GRPC_MESSAGE_LIMIT = MAX_FRAME_SIZE + 64 * 1024

Value = bytes | bytearray | memoryview


def parse_url(url: str) -> tuple[str, int, bool]:
    """Accept grpc://host:port, grpcs://host:port (TLS) or host:port; returns (host, port, tls)."""
    text = url if "://" in url else f"grpc://{url}"
    parsed = urlparse(text)
    if parsed.scheme not in ("grpc", "grpcs") or not parsed.hostname or parsed.port is None:
        raise InvalidRequest(f"pool URL must look like grpc://host:port or grpcs://host:port, got {url!r}")
    return parsed.hostname, parsed.port, parsed.scheme == "grpcs"


class _DataConnection:
    def __init__(
        self, host: str, port: int, token: bytes, timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname=host) if tls is not None else sock
        self.rfile = self.sock.makefile("rb", buffering=READ_BUFFER)
        self.sock.sendall(dp.encode_hello(token))
        self.read_status()

    def read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("data channel closed mid-response")
        return data

    def read_status(self) -> int:
        status, count = dp.STATUS_STRUCT.unpack(self.read_exact(dp.STATUS_STRUCT.size))
        if status != dp.STATUS_OK:
            (length,) = dp.MSG_LEN.unpack(self.read_exact(dp.MSG_LEN.size))
            message = self.read_exact(length).decode(errors="replace")
            if status == dp.STATUS_INVALID:
                raise InvalidRequest(message)
            if status == dp.STATUS_UNAUTHENTICATED:
                raise Unauthenticated(message)
            raise Unavailable(f"data channel: {message}")
        return count

    def close(self) -> None:
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


class Client:
    """Thread-safe; reuse one per process. Use as a context manager or call close()."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        use_data_channel: bool = True,
        data_connections: int = DATA_CONNECTIONS,
        tls_ca_file: str | None = None,
    ) -> None:
        """`tls_ca_file` (default env KVPOOL_TLS_CA_FILE, else the system roots) for grpcs:// pools."""
        self.url = url
        self._host, self._port, tls = parse_url(url)
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._use_data_channel = use_data_channel
        options = [
            ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
        ]
        target = f"{self._host}:{self._port}"
        self._tls: ssl.SSLContext | None = None
        if tls:
            ca_file = tls_ca_file or os.environ.get("KVPOOL_TLS_CA_FILE") or None
            try:
                root = read_ca(ca_file)
                self._tls = client_context(ca_file)
            except (ValueError, OSError, ssl.SSLError) as exc:
                raise InvalidRequest(str(exc)) from None
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.CacheNodeStub(self._channel)
        self._hello: pb.HelloResponse | None = None
        self._hello_lock = threading.Lock()
        self._idle: collections.deque[_DataConnection] = collections.deque()  # append/pop are atomic
        self._max_idle = max(1, data_connections)
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.pop().close()
            except IndexError:
                break
        self._channel.close()

    # -- public API ----------------------------------------------------------------------
    def put(self, key: bytes, value: Value) -> None:
        self.put_many({key: value})

    def put_many(self, mapping: Mapping[bytes, Value] | Iterable[tuple[bytes, Value]]) -> None:
        items = list(mapping.items()) if isinstance(mapping, Mapping) else list(mapping)
        hello = self.hello()
        for key, value in items:
            check_key(key)
            check_value_size(memoryview(value).nbytes, hello.max_value_size)
        for batch in _batches(items, hello.max_batch_keys):
            if self._data_channel_on():
                self._with_data_connection(lambda conn, b=batch: self._put_data(conn, b))
            else:
                self._put_grpc(batch)

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        keys = [check_key(k) for k in keys]
        batch = self.hello().max_batch_keys
        found: dict[bytes, bytes] = {}
        for start in range(0, len(keys), batch):
            chunk = keys[start : start + batch]
            if self._data_channel_on():
                found.update(self._with_data_connection(lambda conn, c=chunk: self._get_data(conn, c)))
            else:
                found.update(self._get_grpc(chunk))
        return found

    def get_into(self, key: bytes, buffer) -> int | None:
        """Receive a value straight into `buffer` (writable, large enough); its size, or None."""
        check_key(key)
        if not self._data_channel_on():
            value = self.get(key)
            if value is None:
                return None
            memoryview(buffer).cast("B")[: len(value)] = value
            return len(value)
        return self._with_data_connection(lambda conn: self._get_into_data(conn, key, buffer))

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._call(self._stub.PrefixHits, pb.KeysRequest(keys=list(keys))).count

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return list(self._call(self._stub.Contains, pb.KeysRequest(keys=list(keys))).present)

    def delete(self, keys: Sequence[bytes]) -> int:
        return self._call(self._stub.Delete, pb.KeysRequest(keys=list(keys))).count

    def stats(self) -> dict:
        return json.loads(self._call(self._stub.Stats, pb.StatsRequest()).json)

    def hello(self) -> pb.HelloResponse:
        if self._hello is None:
            with self._hello_lock:
                if self._hello is None:
                    self._hello = self._call(self._stub.Hello, pb.HelloRequest(client="kvpool-python"))
        return self._hello

    # -- gRPC ----------------------------------------------------------------------------
    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def _put_grpc(self, items: list[tuple[bytes, Value]]) -> None:
        def frames():
            entries = [pb.PutEntry(key=k, size=memoryview(v).nbytes) for k, v in items]
            for i, data in enumerate(split_into_frames((v for _, v in items), MAX_FRAME_SIZE)):
                yield pb.PutFrame(entries=entries if i == 0 else (), data=data)

        self._call(self._stub.Put, frames())

    def _get_grpc(self, keys: list[bytes]) -> dict[bytes, bytes]:
        try:
            stream = self._stub.Get(pb.GetRequest(keys=keys), timeout=self._timeout, metadata=self._metadata)
            sizes: list[int] = []
            data = bytearray()
            for i, frame in enumerate(stream):
                if i == 0:
                    sizes = list(frame.sizes)
                data += frame.data
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        found: dict[bytes, bytes] = {}
        pos = 0
        for key, size in zip(keys, sizes, strict=True):
            if size >= 0:
                found[key] = bytes(data[pos : pos + size])
                pos += size
        return found

    # -- data channel --------------------------------------------------------------------
    def _data_channel_on(self) -> bool:
        return self._use_data_channel and self.hello().data_port != 0

    def _with_data_connection(self, operation):
        """Run on a pooled connection; a stale pooled connection is retried once on a fresh one."""
        for attempt in (0, 1):
            conn, reused = self._acquire()
            try:
                result = operation(conn)
            except KVPoolError:
                conn.close()
                raise
            except (OSError, ConnectionError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise Unavailable(
                    f"data channel to {self._host}:{self.hello().data_port} failed: {exc}"
                ) from None
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return result
        raise AssertionError("unreachable")

    def _acquire(self) -> tuple[_DataConnection, bool]:
        if self._closed:
            raise Unavailable("client is closed")
        try:
            return self._idle.pop(), True
        except IndexError:
            pass
        hello = self.hello()
        host = hello.data_host or self._host
        try:
            return _DataConnection(host, hello.data_port, hello.data_token, self._timeout, self._tls), False
        except KVPoolError:
            raise
        except OSError as exc:
            raise Unavailable(f"cannot reach data channel {host}:{hello.data_port}: {exc}") from None

    def _release(self, conn: _DataConnection) -> None:
        if len(self._idle) < self._max_idle and not self._closed:
            self._idle.append(conn)
        else:
            conn.close()

    @staticmethod
    def _put_data(conn: _DataConnection, items: list[tuple[bytes, Value]]) -> None:
        views = [memoryview(v).cast("B") for _, v in items]
        header = dp.encode_put([(k, len(v)) for (k, _), v in zip(items, views, strict=True)])
        dp.send_buffers(conn.sock, [header, *views])
        conn.read_status()

    @staticmethod
    def _get_data(conn: _DataConnection, keys: list[bytes]) -> dict[bytes, bytes]:
        conn.sock.sendall(dp.encode_get(keys))
        count = conn.read_status()
        sizes = dp.parse_sizes(conn.read_exact(count * dp.SIZE.size), count)
        found: dict[bytes, bytes] = {}
        for key, size in zip(keys, sizes, strict=True):
            if size >= 0:
                found[key] = conn.read_exact(size)
        return found

    @staticmethod
    def _get_into_data(conn: _DataConnection, key: bytes, buffer) -> int | None:
        conn.sock.sendall(dp.encode_get([key]))
        count = conn.read_status()
        (size,) = dp.parse_sizes(conn.read_exact(count * dp.SIZE.size), count)
        if size < 0:
            return None
        view = memoryview(buffer).cast("B")
        if len(view) < size:  # the unread value stays on this connection, which is dropped with the error
            raise InvalidRequest(f"buffer of {len(view)} bytes is too small for a {size}-byte value")
        got = conn.rfile.readinto(view[:size])
        if got != size:
            raise ConnectionError("data channel closed mid-value")
        return size


def _batches(items: list[tuple[bytes, Value]], max_keys: int):
    batch: list[tuple[bytes, Value]] = []
    size = 0
    for item in items:
        n = memoryview(item[1]).nbytes
        if batch and (len(batch) >= max_keys or size + n > MAX_REQUEST_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


def _translate(exc: grpc.RpcError) -> KVPoolError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
    ):
        return InvalidRequest(detail)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(detail)
    return Unavailable(f"{code.name if code else 'error'}: {detail}")
