"""The `Agent` gRPC service: the connector in the pod asks where chunks are in the arena file.

Control only: keys, counts, offsets, leases and checksums cross gRPC; the chunk bytes are read
and written by the connector in its own mapping of the arena. Every request is checked (key
sizes, counts, value sizes against the agent's limits) before the arena is touched.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, NoReturn, Protocol

import grpc

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import CorruptData, InvalidRequest, LeaseGone, NodeLeaving, NoRoom
from kvpool.cachenode.core.validation import check_keys, check_value_size
from kvpool.cachenode.rpc.proto import agent_pb2 as pb
from kvpool.cachenode.rpc.proto import agent_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import abort
from kvpool.cachenode.server import control

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from kvpool.cachenode.core.settings import AgentSettings
    from kvpool.cachenode.server.nixl_leases import TransferLease, TransferLeases
    from kvpool.cachenode.server.tiers.store import TieredStore


class ServedAgent(Protocol):
    """What the service needs of its agent (``server.AgentServer``, which builds the service:
    naming the class here would tie the two modules into a cycle)."""

    agent_settings: AgentSettings
    arena_id: int
    arena_identity: str
    arena_path: Path
    leases: TransferLeases
    node_id: str
    store: TieredStore

    def put_refusal(self) -> str | None: ...
    def locate(self, keys: list[bytes], lease_ms: int, lease_id: int) -> tuple[int, int, int]: ...
    def unpin(self, lease_id: int, keys: Sequence[bytes] | None) -> int: ...
    def acquire(self, keys: list[bytes]) -> TransferLease: ...


log = logging.getLogger(__name__)

TRANSPORT = "arena"


class AgentService(pb_grpc.AgentServicer):
    def __init__(self, agent: ServedAgent) -> None:
        self._agent = agent
        self._max_value_size = agent.agent_settings.max_value_size
        self._max_batch_keys = agent.agent_settings.max_batch_keys

    def Attach(self, request: pb.AgentAttachRequest, context: grpc.ServicerContext) -> pb.AgentAttachResponse:
        a = self._agent
        log.info("connector %s attached to the arena %s", request.client or "(unnamed)", a.arena_path)
        return pb.AgentAttachResponse(
            agent_id=a.node_id,
            arena_path=str(a.arena_path),
            arena_size=a.store.memory.arena_bytes,
            arena_id=a.arena_id,
            lease_ttl_ms=int(a.leases.ttl_s * 1000),
            max_value_size=self._max_value_size,
            max_batch_keys=self._max_batch_keys,
            arena_identity=a.arena_identity,
        )

    def Locate(self, request: pb.AgentLocateRequest, context: grpc.ServicerContext) -> pb.AgentLocateResponse:
        keys = self._keys(request.keys, context)
        try:
            count, lease_id, local = control.locate(
                self._agent, keys, request.lease_ms, request.lease_id, TRANSPORT
            )
        except InvalidRequest as exc:
            self._abort(context, exc, "agent_invalid")
        return pb.AgentLocateResponse(count=count, lease_id=lease_id, local=local)

    def Unpin(self, request: pb.AgentUnpinRequest, context: grpc.ServicerContext) -> pb.AgentUnpinResponse:
        keys = self._keys(request.keys, context) if request.keys else None
        return pb.AgentUnpinResponse(count=control.unpin(self._agent, request.lease_id, keys, TRANSPORT))

    def Get(self, request: pb.AgentGetRequest, context: grpc.ServicerContext) -> pb.AgentLease:
        keys = self._keys(request.keys, context)
        started = time.perf_counter()
        try:
            lease = self._agent.acquire(keys)
        except NoRoom as exc:
            self._abort(context, exc, "agent_no_room")
        sizes = [-1 if b is None else b.nbytes for b in lease.buffers]
        metrics.REQUESTS.labels("get", TRANSPORT).inc()
        metrics.REQUESTED_KEYS.inc(len(keys))
        metrics.HIT_KEYS.inc(sum(1 for s in sizes if s >= 0))
        metrics.BYTES_OUT.labels(TRANSPORT).inc(sum(s for s in sizes if s > 0))
        metrics.LATENCY.labels("get").observe(time.perf_counter() - started)
        return self._lease(lease, sizes)

    def Reserve(self, request: pb.AgentReserveRequest, context: grpc.ServicerContext) -> pb.AgentLease:
        entries = [(bytes(e.key), e.size) for e in request.entries]
        refused = self._agent.put_refusal()
        if refused:
            self._abort(context, NodeLeaving(refused), "agent_stopping")
        try:
            check_keys([k for k, _ in entries], self._max_batch_keys)
            for _, size in entries:
                check_value_size(size, self._max_value_size)
            lease = self._agent.leases.open_put(entries)
        except InvalidRequest as exc:
            self._abort(context, exc, "agent_invalid")
        except NoRoom as exc:
            self._abort(context, exc, "agent_no_room")
        return self._lease(lease, [b.nbytes for b in lease.buffers])

    def Commit(self, request: pb.AgentCommitRequest, context: grpc.ServicerContext) -> pb.AgentCommitResponse:
        started = time.perf_counter()
        try:
            stored = self._agent.leases.commit(request.lease_id, request.token, list(request.checksums))
        except LeaseGone as exc:
            self._abort(context, exc, "agent_lease_gone")
        except CorruptData as exc:
            self._abort(context, exc, "agent_corrupt")
        except InvalidRequest as exc:
            self._abort(context, exc, "agent_invalid")
        metrics.REQUESTS.labels("put", TRANSPORT).inc()
        metrics.LATENCY.labels("put").observe(time.perf_counter() - started)
        return pb.AgentCommitResponse(stored=stored)

    def Done(self, request: pb.AgentDoneRequest, context: grpc.ServicerContext) -> pb.AgentDoneResponse:
        return pb.AgentDoneResponse(released=self._agent.leases.release(request.lease_id, request.token))

    # -- helpers -------------------------------------------------------------------------------

    def _lease(self, lease, sizes: list[int]) -> pb.AgentLease:
        return pb.AgentLease(
            lease_id=lease.lease_id,
            token=lease.token,
            ttl_ms=int(self._agent.leases.ttl_s * 1000),
            arena_id=self._agent.arena_id,
            sizes=sizes,
            offsets=[0 if b is None else b.offset for b in lease.buffers],
        )

    def _keys(self, keys, context: grpc.ServicerContext) -> list[bytes]:
        keys = [bytes(k) for k in keys]
        try:
            check_keys(keys, self._max_batch_keys)
        except InvalidRequest as exc:
            self._abort(context, exc, "agent_invalid")
        return keys

    @staticmethod
    def _abort(context: grpc.ServicerContext, error: Exception, kind: str) -> NoReturn:
        metrics.ERRORS.labels(kind).inc()
        abort(context, error)
