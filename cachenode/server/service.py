"""The CacheNode gRPC service: control calls plus the ≤ 4 MiB-frame fallback for bulk bytes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import grpc

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import InvalidRequest, NodeLeaving
from kvpool.cachenode.core.settings import MAX_FRAME_SIZE
from kvpool.cachenode.core.validation import check_keys, check_value_size
from kvpool.cachenode.rpc.grpcframes import split_into_frames
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import abort
from kvpool.cachenode.server import control
from kvpool.cachenode.server.tiers.memory import drain

if TYPE_CHECKING:
    from kvpool.cachenode.core.settings import NodeSettings
    from kvpool.cachenode.server.peers import PeerTracker
    from kvpool.cachenode.server.tiers.store import TieredStore


class ServedNode(Protocol):
    """What the service needs of the node it serves (``node.CacheNode``, which builds the service:
    naming the class here would tie the two modules into a cycle)."""

    store: TieredStore
    settings: NodeSettings
    node_id: str
    version: str
    kind: str
    data_port: int
    data_token: bytes
    max_request_bytes: int
    peers: PeerTracker | None

    def put_refusal(self) -> str | None: ...
    def stats(self) -> dict: ...


log = logging.getLogger(__name__)


class CacheNodeService(pb_grpc.CacheNodeServicer):
    def __init__(self, node: ServedNode) -> None:
        self._node = node
        self._store = node.store
        self._settings = node.settings

    # -- control -------------------------------------------------------------------------
    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloResponse:
        return pb.HelloResponse(
            node_id=self._node.node_id,
            version=self._node.version,
            data_port=self._node.data_port,
            data_token=self._node.data_token,
            max_value_size=self._settings.max_value_size,
            max_batch_keys=self._settings.max_batch_keys,
            max_frame_size=MAX_FRAME_SIZE,
            data_host=self._settings.advertise_host,
            kind=self._node.kind,
        )

    def PrefixHits(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        keys = self._checked_keys(request.keys, context)
        try:
            count, lease_id = control.prefix_hits(
                self._store, keys, request.lease_ms, request.lease_id, "grpc"
            )
        except InvalidRequest as exc:
            metrics.ERRORS.labels("grpc_invalid").inc()
            abort(context, exc)
        return pb.CountResponse(count=count, lease_id=lease_id)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        keys = self._checked_keys(request.keys, context) if request.keys else None
        return pb.CountResponse(count=control.release(self._store, request.lease_id, keys, "grpc"))

    def Contains(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.ContainsResponse:
        keys = self._checked_keys(request.keys, context)
        return pb.ContainsResponse(present=control.contains(self._store, keys, "grpc"))

    def Delete(self, request: pb.KeysRequest, context: grpc.ServicerContext) -> pb.CountResponse:
        keys = self._checked_keys(request.keys, context)
        metrics.REQUESTS.labels("delete", "grpc").inc()
        return pb.CountResponse(count=self._store.delete(keys))

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        metrics.REQUESTS.labels("stats", "grpc").inc()
        return pb.StatsResponse(json=json.dumps(self._node.stats(), default=str))

    def Members(self, request: pb.MembersRequest, context: grpc.ServicerContext) -> pb.MembersResponse:
        metrics.REQUESTS.labels("members", "grpc").inc()
        if request.HasField("caller"):
            self._node.peers.announced(request.caller, context.peer())
        return self._node.peers.members_reply()

    # -- bulk fallback -------------------------------------------------------------------
    def Put(self, request_iterator: Iterator[pb.PutFrame], context: grpc.ServicerContext) -> pb.PutResponse:
        started = time.perf_counter()
        refused = self._node.put_refusal()
        if refused:
            abort(context, NodeLeaving(refused))
        frames = iter(request_iterator)
        first = next(frames, None)
        if first is None:
            return pb.PutResponse(stored=0)
        entries = [(bytes(e.key), e.size) for e in first.entries]
        keys = self._checked_keys([k for k, _ in entries], context)
        total = 0
        try:
            for _, size in entries:
                check_value_size(size, self._settings.max_value_size)
                total += size
            if total > self._node.max_request_bytes:
                raise InvalidRequest(
                    f"put of {total} bytes exceeds the node's limit of {self._node.max_request_bytes}"
                )
        except InvalidRequest as exc:
            metrics.ERRORS.labels("grpc_invalid").inc()
            abort(context, exc)
        buffers = [self._store.allocate(size) for _, size in entries]  # L1 ranges, stored as they are
        buffers = [bytearray(size) if b is None else b for b, (_, size) in zip(buffers, entries, strict=True)]
        index, offset = 0, 0

        def absorb(data: bytes) -> None:
            nonlocal index, offset
            view = memoryview(data)
            while view:
                while index < len(buffers) and offset == len(buffers[index]):
                    index, offset = index + 1, 0
                if index >= len(buffers):
                    raise InvalidRequest(f"put frames carry more than the announced {total} bytes")
                take = min(len(view), len(buffers[index]) - offset)
                buffers[index][offset : offset + take] = view[:take]
                offset += take
                view = view[take:]

        try:
            absorb(first.data)
            for frame in frames:
                if frame.entries:
                    raise InvalidRequest("only the first put frame may carry entries")
                absorb(frame.data)
            received = sum(len(b) for b in buffers[:index]) + offset
            if received != total:
                raise InvalidRequest(f"put stream ended after {received} of {total} announced bytes")
        except InvalidRequest as exc:
            metrics.ERRORS.labels("grpc_invalid").inc()
            abort(context, exc)
        pairs = list(zip(keys, buffers, strict=True))
        buffers.clear()
        self._store.put_many(drain(pairs))  # the store owns the buffers now
        metrics.REQUESTS.labels("put", "grpc").inc()
        metrics.BYTES_IN.labels("grpc").inc(total)
        metrics.LATENCY.labels("put").observe(time.perf_counter() - started)
        return pb.PutResponse(stored=len(keys))

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Iterator[pb.GetFrame]:
        started = time.perf_counter()
        keys = self._checked_keys(request.keys, context)
        values = self._store.get_many(keys)
        sizes = [-1 if v is None else memoryview(v).nbytes for v in values]
        metrics.REQUESTS.labels("get", "grpc").inc()
        metrics.REQUESTED_KEYS.inc(len(keys))
        metrics.HIT_KEYS.inc(sum(1 for s in sizes if s >= 0))
        sent = 0
        found = (v for v in values if v is not None)
        for i, data in enumerate(split_into_frames(found, MAX_FRAME_SIZE)):
            yield pb.GetFrame(sizes=sizes if i == 0 else (), data=data)
            sent += len(data)
        metrics.BYTES_OUT.labels("grpc").inc(sent)
        metrics.LATENCY.labels("get").observe(time.perf_counter() - started)

    # -- helpers -------------------------------------------------------------------------
    def _checked_keys(self, keys, context: grpc.ServicerContext) -> list[bytes]:
        keys = [bytes(k) for k in keys]
        try:
            check_keys(keys, self._settings.max_batch_keys)
        except InvalidRequest as exc:
            metrics.ERRORS.labels("grpc_invalid").inc()
            abort(context, exc)
        return keys
