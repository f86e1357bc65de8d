"""`NodeConnection`: everything a client says to one node, and nothing about pools.

Control calls go over gRPC (the channel from rpc/channels.py), except the small lookups (prefix
hits, leases, contains), which take the data channel's control ops in one round trip where the
node offers them; values travel on the node's lean TCP data channel (datachannel.py, learned with
one Hello call), received straight into the result objects; the ≤ 4 MiB-frame gRPC stream is the
fallback when the data channel is off or unreachable, and NIXL (nixl.py) the fast path where it
is on. `Client` (pool.py) routes keys over one NodeConnection per pool member; nodes use it too,
to probe their peers and hand chunks over.

Every reply is checked before it is believed: counts must match the request, sizes must lie
within the node's announced limits and add up to the bytes that arrived. A reply that does not
is an `Unavailable` (the node is misbehaving; its keys are routed elsewhere), never a short or
shifted value handed to the caller.
"""

from __future__ import annotations

import json
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer
from kvpool.cachenode.client.control_ops import CALLS, NoControlOps, control_request
from kvpool.cachenode.client.datachannel import DataChannel, Value, acquire_buffer, check_sizes
from kvpool.cachenode.client.nixl import NixlRoute
from kvpool.cachenode.core.errors import BadReply, InvalidRequest, Unavailable
from kvpool.cachenode.core.record import MAX_KEY_SIZE
from kvpool.cachenode.core.settings import MAX_FRAME_SIZE
from kvpool.cachenode.core.urls import format_url
from kvpool.cachenode.core.validation import check_keys, check_value_size
from kvpool.cachenode.rpc.channels import Metadata, bearer_metadata, open_channel, trust
from kvpool.cachenode.rpc.grpcframes import split_into_frames
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import translate

DEFAULT_TIMEOUT_S = 10.0
DATA_CONNECTIONS = 4
MAX_REQUEST_BYTES = 256 * 1024 * 1024
GRPC_MESSAGE_LIMIT = MAX_FRAME_SIZE + 64 * 1024
MEMBER_STATES = ("starting", "ready", "leaving", "down")
MAX_NODE_ID = 253
RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1000  # a DNS name (the StatefulSet pod name in Kubernetes)

TRANSPORTS = ("auto", "nixl", "grpc")
DEFAULT_RECEIVE_BUFFER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach any node of one pool: the same token, timeout and TLS roots for all."""

    timeout: float = DEFAULT_TIMEOUT_S
    token: str | None = None
    use_data_channel: bool = True
    data_connections: int = DATA_CONNECTIONS
    tls: bool = False
    tls_root: bytes | None = None
    tls_context: ssl.SSLContext | None = None
    transport: str = "grpc"  # "auto" / "nixl": bulk bytes over NIXL where it is the fast path

    @classmethod
    def build(
        cls,
        *,
        tls: bool,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        use_data_channel: bool = True,
        data_connections: int = DATA_CONNECTIONS,
        tls_ca_file: str | None = None,
        transport: str = "grpc",
    ) -> ConnectOptions:
        """`tls_ca_file` (default env KVPOOL_TLS_CA_FILE, else the system roots) for grpcs:// pools."""
        if timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout}")
        if transport not in TRANSPORTS:
            raise InvalidRequest(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        root, context = trust(tls_ca_file) if tls else (None, None)
        return cls(timeout, token, use_data_channel, max(1, data_connections), tls, root, context, transport)

    @property
    def metadata(self) -> Metadata:
        return bearer_metadata(self.token)


class Pending:
    """A gRPC call in flight; `result()` gives the checked answer or raises a KVPoolError."""

    def __init__(self, future, check) -> None:
        self._future = future
        self._check = check

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _: fn())

    def result(self):
        try:
            reply = self._future.result()
        except grpc.RpcError as exc:
            raise translate(exc) from None
        return self._check(reply)


class NodeConnection:
    """One node: a gRPC channel plus a few pooled data connections. Thread-safe."""

    def __init__(
        self,
        host: str,
        port: int,
        options: ConnectOptions,
        buffers: Callable[[], BufferPool] | None = None,
        server_name: str | None = None,
    ) -> None:
        """`buffers`: the client's pool of receive buffers (`get_many_into`, NIXL READs).
        `server_name`: with TLS, the name to verify the certificate against when `host` is an
        address a name resolved to (peer discovery through a headless Service's name)."""
        self.host = host
        self.port = port
        self.options = options
        self.url = format_url(host, port, options.tls)
        channel_options = [
            ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
            ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
            # A node that comes back is tried again within a fraction of a second: whether to call
            # a failing node at all is the pool's breaker's decision, not gRPC's back-off (1-120 s).
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        self._channel = open_channel(
            host,
            port,
            tls=options.tls,
            options=channel_options,
            root_certificates=options.tls_root,
            server_name=server_name,
        )
        self._stub = pb_grpc.CacheNodeStub(self._channel)
        self._hello: pb.HelloResponse | None = None
        self._hello_lock = threading.Lock()
        self._closed = False
        self._buffers = buffers or _own_buffers()
        self._data = DataChannel(
            host,
            self.url,
            self.hello,
            self._forget_hello,
            self._buffers,
            timeout=options.timeout,
            tls=options.tls_context,
            max_idle=options.data_connections,
        )
        self._nixl = (
            None
            if options.transport == "grpc"
            else NixlRoute(options.transport, self._channel, self._call, self._buffers)
        )

    def __repr__(self) -> str:
        return f"NodeConnection({self.url})"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        self._data.close()
        if self._nixl is not None:
            self._nixl.close()
        self._channel.close()

    @property
    def transport_in_use(self) -> str:
        """Which transport bulk requests take now, and why (NIXL's path or the fallback's reason)."""
        if self._nixl is None:
            return "tcp data channel" if self.options.use_data_channel else "grpc frames"
        return self._nixl.describe()

    def forget_session(self) -> None:
        """The node behind this address restarted: its data port and session token are new."""
        with self._hello_lock:
            self._hello = None
        self._data.drop_idle()

    def _forget_hello(self, hello: pb.HelloResponse) -> None:
        with self._hello_lock:
            if self._hello is hello:
                self._hello = None

    # -- calls ---------------------------------------------------------------------------
    def hello(self) -> pb.HelloResponse:
        if self._hello is None:
            with self._hello_lock:
                if self._hello is None:
                    self._hello = self._call(self._stub.Hello, pb.HelloRequest(client="kvpool-python"))
        return self._hello

    def put_many(self, items: list[tuple[bytes, Value]]) -> None:
        """Store checked pairs (keys checked by the caller); sizes are checked against the node."""
        hello = self.hello()
        for _, value in items:
            check_value_size(memoryview(value).nbytes, hello.max_value_size)
        for batch in _batches(items, hello.max_batch_keys):
            if self._nixl is not None and self._nixl.put_many(batch):
                continue
            if self._data_channel_on():
                self._data.put(batch)
            else:
                self._put_grpc(batch)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        hello = self.hello()
        found: dict[bytes, bytes] = {}
        for start in range(0, len(keys), hello.max_batch_keys):
            chunk = list(keys[start : start + hello.max_batch_keys])
            got = self._nixl.get_many(chunk) if self._nixl is not None else None
            if got is not None:
                found.update(got)
            elif self._data_channel_on():
                found.update(self._data.get(chunk))
            else:
                found.update(self._get_grpc(chunk))
        return found

    def get_many_into(self, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer]:
        """Receive values straight into pooled buffers (NIXL READ or the data channel's
        recv_into); missing keys are absent. The caller releases each buffer."""
        hello = self.hello()
        found: dict[bytes, PooledBuffer] = {}
        try:
            for start in range(0, len(keys), hello.max_batch_keys):
                chunk = list(keys[start : start + hello.max_batch_keys])
                got = self._nixl.get_many_into(chunk) if self._nixl is not None else None
                if got is None and self._data_channel_on():
                    got = self._data.get_into_pool(chunk)
                elif got is None:
                    got = {}
                    for key, value in self._get_grpc(chunk).items():
                        got[key] = buf = acquire_buffer(self._buffers, len(value))
                        buf.view[:] = value
                found.update(got)
        except BaseException:
            for buf in found.values():
                buf.release()
            raise
        return found

    def get_into(self, key: bytes, buffer) -> int | None:
        """Receive a value straight into `buffer` (writable, large enough); its size, or None."""
        if not self._data_channel_on():
            value = self.get_many([key]).get(key)
            if value is None:
                return None
            view = memoryview(buffer).cast("B")
            if len(view) < len(value):
                raise InvalidRequest(
                    f"buffer of {len(view)} bytes is too small for a {len(value)}-byte value"
                )
            view[: len(value)] = value
            return len(value)
        return self._data.get_into(key, buffer)

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        keys = list(keys)
        finish = self.begin("prefix_hits", keys)
        if finish is not None:
            return finish()
        reply = self._call(self._stub.PrefixHits, pb.KeysRequest(keys=keys))
        if reply.count > len(keys):
            raise BadReply(f"{self.url}: prefix of {reply.count} hits for {len(keys)} keys")
        return reply.count

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int, lease_id: int = 0) -> tuple[int, int]:
        """prefix_hits that also pins what it found for ``lease_ms`` under ``lease_id``
        (0: the node picks one); returns (count, lease id), the id 0 when nothing was pinned."""
        keys = list(keys)
        if not 0 <= lease_ms < 1 << 32 or not 0 <= lease_id < 1 << 64:
            raise InvalidRequest(f"lease_ms {lease_ms} or lease id {lease_id} out of range")
        finish = self.begin("lease_prefix", keys, int(lease_ms), lease_id)
        if finish is not None:
            return finish()
        request = pb.KeysRequest(keys=keys, lease_ms=int(lease_ms), lease_id=lease_id)
        reply = self._call(self._stub.PrefixHits, request)
        if reply.count > len(keys):
            raise BadReply(f"{self.url}: prefix of {reply.count} hits for {len(keys)} keys")
        return reply.count, reply.lease_id

    def release(self, lease_id: int, keys: Sequence[bytes] | None = None) -> int:
        """Unpin ``keys`` of a lease (the whole lease when None); returns how many were unpinned."""
        keys = list(keys or ())
        if not 0 <= lease_id < 1 << 64:
            raise InvalidRequest(f"lease id {lease_id} out of range")
        finish = self.begin("release", keys, lease_id)
        if finish is not None:
            return finish()
        request = pb.ReleaseRequest(lease_id=lease_id, keys=keys)
        return self._call(self._stub.Release, request).count

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        keys = list(keys)
        finish = self.begin("contains", keys)
        if finish is not None:
            return finish()
        reply = self._call(self._stub.Contains, pb.KeysRequest(keys=keys))
        if len(reply.present) != len(keys):
            raise BadReply(f"{self.url}: {len(reply.present)} flags for {len(keys)} keys")
        return list(reply.present)

    def begin(self, call: str, keys: Sequence[bytes], *args: int) -> Callable[[], object] | None:
        """Send `call` ("prefix_hits", "contains", "lease_prefix" with lease_ms, lease_id, or
        "release" with lease_id) on the data channel now; the function returned waits for its
        answer, as the method of that name gives it. None: make the call itself (over gRPC)."""
        keys = list(keys)
        if not self._control_on(keys):
            return None
        try:
            request = control_request(CALLS[call], keys, self.url, *args)
        except struct.error:  # an argument out of range: the method says so
            return None
        try:
            finish = self._data.begin([request])
        except NoControlOps:
            return None
        return lambda: finish()[0]

    def delete(self, keys: Sequence[bytes]) -> int:
        reply = self._call(self._stub.Delete, pb.KeysRequest(keys=list(keys)))
        if reply.count > len(keys):
            raise BadReply(f"{self.url}: deleted {reply.count} of {len(keys)} keys")
        return reply.count

    def stats_async(self) -> Pending:
        def check(reply: pb.StatsResponse) -> dict:
            try:
                stats = json.loads(reply.json)
            except ValueError:
                stats = None
            if not isinstance(stats, dict):
                raise BadReply(f"{self.url}: stats are not a JSON object")
            return stats

        return self._future(self._stub.Stats, pb.StatsRequest(), check)

    def members_async(self, caller: pb.Member | None = None, timeout: float | None = None) -> Pending:
        def check(reply: pb.MembersResponse) -> pb.MembersResponse:
            for member in (reply.node, *reply.peers):
                check_member(member, self.url)
            return reply

        request = pb.MembersRequest(caller=caller) if caller is not None else pb.MembersRequest()
        return self._future(self._stub.Members, request, check, timeout)

    def stats(self) -> dict:
        return self.stats_async().result()

    def members(self, caller: pb.Member | None = None, timeout: float | None = None) -> pb.MembersResponse:
        return self.members_async(caller, timeout).result()

    # -- gRPC ----------------------------------------------------------------------------
    def _call(self, method, request):
        try:
            return method(request, timeout=self.options.timeout, metadata=self.options.metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from None

    def _future(self, method, request, check, timeout: float | None = None) -> Pending:
        if self._closed:
            raise Unavailable("client is closed")
        future = method.future(
            request, timeout=timeout or self.options.timeout, metadata=self.options.metadata
        )
        return Pending(future, check)

    def _put_grpc(self, items: list[tuple[bytes, Value]]) -> None:
        def frames():
            entries = [pb.PutEntry(key=k, size=memoryview(v).nbytes) for k, v in items]
            for i, data in enumerate(split_into_frames((v for _, v in items), MAX_FRAME_SIZE)):
                yield pb.PutFrame(entries=entries if i == 0 else (), data=data)

        reply = self._call(self._stub.Put, frames())
        if reply.stored != len(items):
            raise BadReply(f"{self.url}: stored {reply.stored} of {len(items)} values")

    def _get_grpc(self, keys: list[bytes]) -> dict[bytes, bytes]:
        limit = self.hello().max_value_size
        sizes: list[int] = []
        expected = 0
        data = bytearray()
        try:
            stream = self._stub.Get(
                pb.GetRequest(keys=keys), timeout=self.options.timeout, metadata=self.options.metadata
            )
            for i, frame in enumerate(stream):
                if i == 0:
                    sizes = list(frame.sizes)
                    expected = check_sizes(sizes, len(keys), limit, self.url)
                elif frame.sizes:
                    raise BadReply(f"{self.url}: sizes in a later get frame")
                if len(data) + len(frame.data) > expected:
                    stream.cancel()
                    raise BadReply(f"{self.url}: get sent more than the {expected} bytes it announced")
                data += frame.data
        except grpc.RpcError as exc:
            raise translate(exc) from None
        if not sizes and keys:
            raise BadReply(f"{self.url}: get reply without sizes")
        if len(data) != expected:
            raise BadReply(f"{self.url}: get sent {len(data)} of the {expected} bytes it announced")
        found: dict[bytes, bytes] = {}
        pos = 0
        view = memoryview(data)
        for key, size in zip(keys, sizes, strict=True):
            if size >= 0:
                found[key] = bytes(view[pos : pos + size])
                pos += size
        return found

    # -- data channel --------------------------------------------------------------------
    def _data_channel_on(self) -> bool:
        return self.options.use_data_channel and self.hello().data_port != 0

    def _control_on(self, keys: list[bytes]) -> bool:
        """Whether a control call goes over the data channel (the node advertises one whose
        hello reply offers the control ops); its keys are then checked here, as the node's gRPC
        service would, so that bad input is refused without costing the connection."""
        if not (self._data_channel_on() and self._data.supports()):
            return False
        limit = self.hello().max_batch_keys
        if len(keys) > limit or not all(type(k) is bytes and 0 < len(k) <= MAX_KEY_SIZE for k in keys):
            check_keys(keys, limit)  # the reason, or a bytes-like key: made bytes here
            keys[:] = [bytes(k) for k in keys]
        return True


def check_member(member: pb.Member, where: str) -> None:
    """A member entry is believed only if its fields make sense."""
    if not 0 < len(member.node_id) <= MAX_NODE_ID:
        raise BadReply(f"{where}: member id of {len(member.node_id)} characters")
    for name in ("grpc_port", "data_port", "http_port"):
        if getattr(member, name) > 65535:
            raise BadReply(f"{where}: member {member.node_id} has {name} {getattr(member, name)}")
    if member.grpc_port == 0:
        raise BadReply(f"{where}: member {member.node_id} has no gRPC port")
    if member.state not in MEMBER_STATES:
        raise BadReply(f"{where}: member {member.node_id} in unknown state {member.state!r}")


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


def _own_buffers() -> Callable[[], BufferPool]:
    """A lazily made receive-buffer pool for a connection used on its own (no pool client)."""
    lock = threading.Lock()
    made: list[BufferPool] = []

    def get() -> BufferPool:
        with lock:
            if not made:
                made.append(BufferPool(DEFAULT_RECEIVE_BUFFER_BYTES, prefault=False))
            return made[0]

    return get
