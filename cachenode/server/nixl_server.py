"""The node side of NIXL: one agent with the L1 arena registered once, the NixlTransfer gRPC
service that hands out descriptors under leases, and a thread that ends leases when a
client's transfer notification arrives or their TTL passes.

A get: NixlGet pins and holds the values' L1 ranges under a lease (nixl_leases.py) and answers
their addresses; the client READs them all in one transfer whose notification carries the
lease id and token; the notification thread then releases the lease. A put: NixlReserve
allocates ranges under a lease, the client WRITEs, NixlCommit verifies checksums and stores.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from kvpool.cachenode.client.nixl_common import BACKEND, Agent, has_rdma, locality, parse_release
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import CorruptData, InvalidRequest, LeaseGone, NoRoom
from kvpool.cachenode.core.validation import check_keys, check_value_size
from kvpool.cachenode.rpc.proto import nixl_pb2 as pb
from kvpool.cachenode.rpc.proto import nixl_pb2_grpc as pb_grpc
from kvpool.cachenode.server.nixl_leases import TransferLeases

if TYPE_CHECKING:
    from kvpool.cachenode.server.tiers.store import TieredStore

log = logging.getLogger(__name__)

POLL_ACTIVE_S = 0.001  # polling (UCX progress, notifications) while leases are out
SWEEP_INTERVAL_S = 0.25


class NixlEndpoint:
    """The node's NIXL agent and leases. Start after the store; close before it."""

    def __init__(self, store: TieredStore, lease_ttl_s: float) -> None:
        if store.memory.arena is None:
            raise ValueError("NIXL needs an L1 arena (--memory > 0)")
        self.store = store
        self.leases = TransferLeases(store, lease_ttl_s)
        self.agent = Agent("node")
        self._registration = self.agent.register(store.memory.address, store.memory.arena_bytes, "kvpool-l1")
        self.metadata = self.agent.metadata()  # includes the registration: clients load it once
        self.locality = locality()
        self.rdma = has_rdma()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kvpool-nixl-notify", daemon=True)
        self.bad_notifications = 0

    @property
    def name(self) -> str:
        return self.agent.name

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.leases.clear()
        try:
            self.agent.deregister(self._registration)
        except Exception:
            log.exception("NIXL: deregistering the L1 arena failed")

    def wake(self) -> None:
        """A lease went out: poll (progressing UCX, reading notifications) until it is back."""
        with self._wake:
            self._wake.notify_all()

    # -- the notification and sweep thread -----------------------------------------------------

    def _loop(self) -> None:
        next_sweep = 0.0
        while True:
            with self._wake:
                if self._stopping:
                    return
                if not self._leases_out():
                    self._wake.wait(SWEEP_INTERVAL_S)
            self._drain_notifications()
            now = time.monotonic()
            if now >= next_sweep:
                self.leases.sweep()
                next_sweep = now + SWEEP_INTERVAL_S
            if self._leases_out():
                time.sleep(POLL_ACTIVE_S)

    def _leases_out(self) -> bool:
        return bool(self.leases.count("get") or self.leases.count("put"))

    def _drain_notifications(self) -> None:
        try:
            with self.agent.lock:
                notifs = self.agent.agent.get_new_notifs()
        except Exception:
            log.exception("NIXL: reading notifications failed")
            return
        for peer, messages in notifs.items():
            for message in messages:
                parsed = parse_release(message)
                if parsed is None or not self.leases.release(*parsed):
                    self.bad_notifications += 1
                    metrics.ERRORS.labels("nixl_bad_notification").inc()
                    log.debug("NIXL: ignored notification %r from %s", message[:64], peer)


class NixlService(pb_grpc.NixlTransferServicer):
    """gRPC control of NIXL transfers; registered on the node's server beside CacheNode."""

    def __init__(
        self,
        endpoint: NixlEndpoint | None,
        *,
        max_value_size: int,
        max_batch_keys: int,
        reason: str,
        refuse_puts: Callable[[], str | None] = lambda: None,
    ):
        """`refuse_puts`: a reason to refuse puts now (the node is leaving), or None — the same
        rule the data channel and the gRPC puts follow."""
        self._endpoint = endpoint
        self._refuse_puts = refuse_puts
        self._max_value_size = max_value_size
        self._max_batch_keys = max_batch_keys
        self._reason = reason  # why NIXL is off, when it is

    def NixlHello(self, request: pb.NixlHelloRequest, context: grpc.ServicerContext) -> pb.NixlHelloResponse:
        ep = self._endpoint
        if ep is None:
            return pb.NixlHelloResponse(enabled=False, reason=self._reason)
        log.debug("NIXL hello from %s", request.client or "a client")
        return pb.NixlHelloResponse(
            enabled=True,
            agent_name=ep.name,
            agent_metadata=ep.metadata,
            locality=ep.locality,
            rdma=ep.rdma,
            lease_ttl_ms=int(ep.leases.ttl_s * 1000),
            backend=BACKEND,
        )

    def NixlGet(self, request: pb.NixlGetRequest, context: grpc.ServicerContext) -> pb.NixlLease:
        ep = self._checked_endpoint(request.agent_name, context)
        keys = [bytes(k) for k in request.keys]
        started = time.perf_counter()
        try:
            check_keys(keys, self._max_batch_keys)
            lease = ep.leases.open_get(keys)
        except InvalidRequest as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "nixl_invalid")
        except NoRoom as exc:
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "nixl_no_room")
        if lease.lease_id:
            ep.wake()
        memory = ep.store.memory
        sizes = [-1 if b is None else b.nbytes for b in lease.buffers]
        found = sum(1 for s in sizes if s >= 0)
        metrics.REQUESTS.labels("get", "nixl").inc()
        metrics.REQUESTED_KEYS.inc(len(keys))
        metrics.HIT_KEYS.inc(found)
        metrics.NIXL_BYTES.labels("get", "node").inc(sum(s for s in sizes if s > 0))
        metrics.LATENCY.labels("get").observe(time.perf_counter() - started)
        return pb.NixlLease(
            lease_id=lease.lease_id,
            token=lease.token,
            ttl_ms=int(ep.leases.ttl_s * 1000),
            sizes=sizes,
            addresses=[0 if b is None else memory.address_of(b) for b in lease.buffers],
        )

    def NixlReserve(self, request: pb.NixlReserveRequest, context: grpc.ServicerContext) -> pb.NixlLease:
        ep = self._checked_endpoint(request.agent_name, context)
        refused = self._refuse_puts()
        if refused:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, refused, "nixl_leaving")
        entries = [(bytes(e.key), e.size) for e in request.entries]
        try:
            check_keys([k for k, _ in entries], self._max_batch_keys)
            for _, size in entries:
                check_value_size(size, self._max_value_size)
            lease = ep.leases.open_put(entries)
        except InvalidRequest as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "nixl_invalid")
        except NoRoom as exc:
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "nixl_no_room")
        if lease.lease_id:
            ep.wake()  # the client WRITEs next: the node's UCX worker must progress meanwhile
        memory = ep.store.memory
        return pb.NixlLease(
            lease_id=lease.lease_id,
            token=lease.token,
            ttl_ms=int(ep.leases.ttl_s * 1000),
            sizes=[b.nbytes for b in lease.buffers],
            addresses=[memory.address_of(b) for b in lease.buffers],
        )

    def NixlCommit(
        self, request: pb.NixlCommitRequest, context: grpc.ServicerContext
    ) -> pb.NixlCommitResponse:
        ep = self._checked_endpoint(None, context)
        started = time.perf_counter()
        try:
            stored = ep.leases.commit(request.lease_id, request.token, list(request.checksums))
        except LeaseGone as exc:
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "nixl_lease_gone")
        except CorruptData as exc:
            self._abort(context, grpc.StatusCode.DATA_LOSS, str(exc), "nixl_corrupt")
        except InvalidRequest as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "nixl_invalid")
        metrics.REQUESTS.labels("put", "nixl").inc()
        metrics.LATENCY.labels("put").observe(time.perf_counter() - started)
        return pb.NixlCommitResponse(stored=stored)

    def NixlRelease(
        self, request: pb.NixlReleaseRequest, context: grpc.ServicerContext
    ) -> pb.NixlReleaseResponse:
        ep = self._checked_endpoint(None, context)
        return pb.NixlReleaseResponse(released=ep.leases.release(request.lease_id, request.token))

    # -- helpers -------------------------------------------------------------------------------

    def _checked_endpoint(self, agent_name: str | None, context: grpc.ServicerContext) -> NixlEndpoint:
        ep = self._endpoint
        if ep is None:
            self._abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"NIXL is off: {self._reason}", "nixl_off"
            )
        if agent_name is not None and agent_name != ep.name:
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"stale NIXL session: this node's agent is {ep.name}, not {agent_name!r}; call NixlHello",
                "nixl_stale_session",
            )
        return ep

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, kind: str):
        metrics.ERRORS.labels(kind).inc()
        context.abort(code, message)
