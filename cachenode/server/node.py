"""A cache node: the tiered store behind gRPC control, the TCP data channel and HTTP health."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
import uuid
from concurrent import futures
from importlib import metadata
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client.connection import ConnectOptions
from kvpool.cachenode.core.errors import KVPoolError, NixlUnavailable
from kvpool.cachenode.core.placement import Placement
from kvpool.cachenode.core.settings import DEFAULT_GRPC_PORT, MAX_FRAME_SIZE, NodeSettings
from kvpool.cachenode.core.sizes import format_size
from kvpool.cachenode.rpc.auth import BearerTokenInterceptor
from kvpool.cachenode.rpc.proto import kvpool_pb2, kvpool_pb2_grpc, nixl_pb2, nixl_pb2_grpc
from kvpool.cachenode.server import handoff
from kvpool.cachenode.server.dataserver import DataServer
from kvpool.cachenode.server.grpcserver import bind
from kvpool.cachenode.server.httpserver import HealthServer
from kvpool.cachenode.server.nixl_server import NixlEndpoint, NixlService
from kvpool.cachenode.server.peers import PROBE_TIMEOUT_S, PeerTracker
from kvpool.cachenode.server.service import CacheNodeService
from kvpool.cachenode.server.tiers.shared_factory import build_shared_tiers
from kvpool.cachenode.server.tiers.store import TieredStore

if TYPE_CHECKING:
    from kvpool.cachenode.client.publisher import Publisher
    from kvpool.cachenode.core.holders import HolderInfo

log = logging.getLogger(__name__)

SERVICE_NAME = "kvpool.v1.CacheNode"
GRPC_MESSAGE_LIMIT = MAX_FRAME_SIZE + 64 * 1024
GRPC_WORKERS = 32
HANDOFF_CALL_TIMEOUT_S = 10.0
KEPT_HANDOFF_REPORTS = 5
PUBLISHER_FLUSH_S = 2.0


def package_version() -> str:
    try:
        return metadata.version("kvpool")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_store(settings: NodeSettings) -> TieredStore:
    shared = (
        build_shared_tiers(settings.shared, max_value_size=settings.max_value_size)
        if settings.shared is not None
        else []
    )
    return TieredStore(
        settings.memory,
        disk_dir=settings.disk_dir,
        disk_bytes=settings.disk_size,
        shared_tiers=shared,
        high_watermark=settings.high_watermark,
        low_watermark=settings.low_watermark,
    )


class CacheNode:
    """Binds every port in the constructor (so conflicts fail fast), serves after start().

    `store`: serve this store instead of one built from the settings (an agent's arena-file L1);
    `kind`: what Hello reports ("node", or "agent" for kvpool agent)."""

    kind = "node"

    def __init__(self, settings: NodeSettings, *, store: TieredStore | None = None) -> None:
        settings.validate()
        self.settings = settings
        self.node_id = settings.node_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.incarnation = time.time_ns()  # a restart with the same id has a larger one
        self.version = package_version()
        self.data_token = secrets.token_bytes(32)
        self.max_request_bytes = max(settings.max_value_size, settings.memory)
        self.started_at = time.time()
        self.store = store if store is not None else build_store(settings)
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._leaving = threading.Event()
        self._rebalance_cancel = threading.Event()
        self._handoff_lock = threading.Lock()
        self.handoffs: list[dict] = []  # the last few handoff reports, newest last
        try:
            self._peer_options = ConnectOptions.build(
                tls=settings.tls is not None, timeout=PROBE_TIMEOUT_S, token=settings.auth_token
            )
            self._push_options = ConnectOptions.build(
                tls=settings.tls is not None, timeout=HANDOFF_CALL_TIMEOUT_S, token=settings.auth_token
            )
        except KVPoolError as exc:  # a bad KVPOOL_TLS_CA_FILE for reaching TLS peers
            raise ValueError(f"cannot set up connections to peers: {exc}") from None

        token = settings.auth_token
        interceptors = [BearerTokenInterceptor(token)] if token else []
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="kvpool-grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
                ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
                ("grpc.so_reuseport", 0),
            ],
        )
        kvpool_pb2_grpc.add_CacheNodeServicer_to_server(CacheNodeService(self), self._grpc)
        self.nixl, nixl_reason = self._start_nixl(settings)
        nixl_pb2_grpc.add_NixlTransferServicer_to_server(
            NixlService(
                self.nixl,
                max_value_size=settings.max_value_size,
                max_batch_keys=settings.max_batch_keys,
                reason=nixl_reason,
                refuse_puts=self.put_refusal,
            ),
            self._grpc,
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._add_services(self._grpc)
        reflection.enable_server_reflection(
            (
                kvpool_pb2.DESCRIPTOR.services_by_name["CacheNode"].full_name,
                nixl_pb2.DESCRIPTOR.services_by_name["NixlTransfer"].full_name,
                *self._service_names(),
                reflection.SERVICE_NAME,
                health.SERVICE_NAME,
            ),
            self._grpc,
        )
        self.port = bind(self._grpc, settings.host, settings.port, settings.tls)
        self._data = DataServer(
            self.store,
            settings.host,
            settings.data_port,
            token=self.data_token,
            max_value_size=settings.max_value_size,
            max_batch_keys=settings.max_batch_keys,
            max_request_bytes=self.max_request_bytes,
            tls=settings.tls,
            refuse_puts=self.put_refusal,
        )
        self.data_port = self._data.port
        self._http = HealthServer(
            settings.host,
            settings.http_port,
            self._ready.is_set,
            token,
            tls=settings.tls,
        )
        self.http_port = self._http.port
        self.peers = PeerTracker(
            self.member_info,
            peers=settings.peers,
            default_port=settings.port or DEFAULT_GRPC_PORT,
            replication_factor=settings.replication_factor,
            options=self._peer_options,
            on_change=self._view_changed,
        )
        self.publisher = self._make_publisher()

    def _add_services(self, server: grpc.Server) -> None:
        """More gRPC services on this server (an agent's); called before it binds."""

    def _service_names(self) -> tuple[str, ...]:
        """Full names of the services `_add_services` added, for reflection."""
        return ()

    def holder(self) -> HolderInfo:
        """This server as a holder in the lookup service: where peers fetch what it publishes."""
        from kvpool.cachenode.core.holders import HolderInfo  # here: the lookup package imports this module

        tier = "disk" if self.store.disk is not None else "memory"
        return HolderInfo(self.node_id, self.kind, tier, self.url)

    def _make_publisher(self) -> Publisher | None:
        """A Publisher of what the store holds, to --lookup-url (started once the store is ready)."""
        url = self.settings.lookup_url
        if not url:
            return None
        from kvpool.cachenode.client.publisher import (
            Publisher,  # here: the lookup package imports this module
        )

        holder = self.holder()
        if self.settings.host in ("0.0.0.0", "", "::") and not self.settings.advertise_host:
            log.warning(
                "publishing %s to the lookup service: peers on other hosts cannot reach it "
                "(set --advertise-host to an address they can)",
                holder.address,
            )
        try:
            return Publisher(url, holder, self.store.local_keys, token=self.settings.auth_token)
        except (KVPoolError, ValueError) as exc:
            raise ValueError(f"--lookup-url {url}: {exc}") from None

    @property
    def url(self) -> str:
        host = self.settings.advertise_host or _display_host(self.settings.host)
        scheme = "grpcs" if self.settings.tls else "grpc"
        return f"{scheme}://{host}:{self.port}"

    def start(self, wait_ready: bool = True) -> None:
        """Serve health at once; serve data once the disk index is rebuilt."""
        self._http.start()
        if self.nixl is not None:
            self.nixl.start()
        self._grpc.start()
        self._data.start()
        loader = threading.Thread(target=self._load, name="kvpool-index", daemon=True)
        loader.start()
        if wait_ready:
            loader.join()

    def _load(self) -> None:
        started = time.perf_counter()
        self.store.start()
        if self.publisher is not None and not self._stopped.is_set():
            self.store.watch(self.publisher)  # its first snapshot holds the rebuilt disk index
            self.publisher.start()
        if not self._stopped.is_set():
            self.peers.probe_now()  # so this node's first view already holds the peers that answer
            self._ready.set()
            self.peers.update_view()
            self.peers.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s %s ready in %.2f s", self.kind, self.node_id, time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def leaving(self) -> bool:
        return self._leaving.is_set()

    def member_info(self) -> ms.MemberInfo:
        """This node as a pool member (host empty: whatever address the asker reached)."""
        state = ms.LEAVING if self.leaving else ms.READY if self.ready else ms.STARTING
        return ms.MemberInfo(
            node_id=self.node_id,
            host=self.settings.advertise_host,
            grpc_port=self.port,
            data_port=self.data_port,
            http_port=self.http_port,
            state=state,
            incarnation=self.incarnation,
        )

    def put_refusal(self) -> str | None:
        return f"node {self.node_id} is leaving the pool; put to the next owner" if self.leaving else None

    def summary(self) -> str:
        disk = (
            f"disk {format_size(self.settings.disk_size)} at {self.settings.disk_dir}"
            if self.settings.disk_dir
            else "no disk tier"
        )
        return (
            f"kvpool node {self.node_id} on {self.url} (data port {self.data_port}, http {self.http_port}): "
            f"memory {format_size(self.settings.memory)}, {disk}"
            + (
                f", shared tiers {', '.join(self.settings.shared.enabled)}"
                if self.settings.shared and self.settings.shared.enabled
                else ""
            )
            + (f", NIXL agent {self.nixl.name}" if self.nixl is not None else "")
            + (f", publishing to {self.settings.lookup_url}" if self.publisher is not None else "")
            + (", auth on" if self.settings.auth_token else "")
            + (", TLS on" if self.settings.tls else "")
        )

    def stats(self) -> dict:
        with self._handoff_lock:
            handoffs = list(self.handoffs)
        return {
            "node_id": self.node_id,
            "kind": self.kind,
            "version": self.version,
            "uptime_s": round(time.time() - self.started_at, 3),
            **self.store.stats(),  # includes "ready"
            **({"lookup": self.publisher.stats()} if self.publisher is not None else {}),
            "pool": {
                "state": self.member_info().state,
                "incarnation": self.incarnation,
                "view": sorted(self.peers.view),
                "peers": {n: m.state for n, m in sorted(self.peers.peers().items())},
                "replication_factor": self.settings.replication_factor,
                "handoffs": handoffs,
            },
        }

    # -- handoff -------------------------------------------------------------------------
    def _view_changed(self, old: frozenset[str], new: frozenset[str]) -> None:
        """A member joined, came back or went: push what it now owns (in the background)."""
        if self.leaving or self.node_id not in new or not self.ready:
            return
        self._rebalance_cancel.set()
        cancel = self._rebalance_cancel = threading.Event()
        threading.Thread(
            target=self._hand_over,
            args=(Placement(old), Placement(new), "rebalance", cancel),
            name="kvpool-rebalance",
            daemon=True,
        ).start()

    def _hand_over(
        self,
        old: Placement,
        new: Placement,
        reason: str,
        cancel: threading.Event | None = None,
        *,
        keys: list[bytes] | None = None,
        deadline: float | None = None,
    ) -> handoff.HandoffReport | None:
        """Push the memory tier's chunks (or `keys`) that `new` gives to other owners."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.handoff_deadline
        if keys is None:
            keys = list(reversed(self.store.memory.lru_order()))  # the most recently used first
        work = handoff.plan(keys, old, new, self.node_id, self.settings.replication_factor)
        if not work:
            return None
        report = handoff.push(
            work,
            self.peers.peers(),
            self.store.memory.peek,
            self._push_options,
            deadline=deadline,
            reason=reason,
            cancel=cancel,
        )
        log.info(
            "handoff (%s): pushed %d of %d memory chunks to %s in %.2f s (%d late, %d failed, %d gone)",
            reason,
            report.pushed,
            report.planned,
            ", ".join(f"{n} {c}" for n, c in sorted(report.targets.items())) or "-",
            report.seconds,
            report.late,
            report.failed,
            report.gone,
        )
        with self._handoff_lock:
            self.handoffs = [*self.handoffs, report.to_dict()][-KEPT_HANDOFF_REPORTS:]
        return report

    def leave(self) -> handoff.HandoffReport | None:
        """Stop taking puts, tell the peers, and push the memory tier's chunks to their new
        owners within --handoff-deadline. Reads keep being served meanwhile."""
        old = self.peers.view | {self.node_id}
        self._leaving.set()
        self._rebalance_cancel.set()
        self.peers.announce_leaving()
        new = old - {self.node_id}
        if not new:
            log.info("no other ready member: nothing to hand over")
            return None
        log.info(
            "leaving the pool: handing memory chunks to %s (deadline %.0f s)",
            ",".join(sorted(new)),
            self.settings.handoff_deadline,
        )
        deadline = time.monotonic() + self.settings.handoff_deadline
        before, after = Placement(old), Placement(new)
        first = list(reversed(self.store.memory.lru_order()))  # the most recently used first
        report = self._hand_over(before, after, "leave", keys=first, deadline=deadline)
        # puts that were being received as leaving began landed after that snapshot
        seen = set(first)
        late = [k for k in reversed(self.store.memory.lru_order()) if k not in seen]
        if late:
            self._hand_over(before, after, "leave", keys=late, deadline=deadline)
        return report

    def _start_nixl(self, settings: NodeSettings) -> tuple[NixlEndpoint | None, str]:
        """The NIXL endpoint, or None and why not (--nixl on makes a missing NIXL fatal)."""
        if settings.nixl == "off":
            return None, "disabled on this node (--nixl off)"
        try:
            return NixlEndpoint(self.store, settings.nixl_lease_ttl), ""
        except NixlUnavailable as exc:
            if settings.nixl == "on":
                raise OSError(f"--nixl on, but {exc}") from None
            log.info("NIXL off: %s", exc)
            return None, str(exc)

    def stop(self, grace: float = 2.0, handoff: bool = True) -> None:
        """Hand chunks over (`handoff` and a positive --handoff-deadline), stop accepting,
        finish in-flight calls, flush pending disk writes."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if handoff and self.settings.handoff_deadline > 0 and self.ready:
            try:
                self.leave()
            except Exception:  # stopping must not fail because the handoff did
                log.exception("handoff failed")
        self._leaving.set()
        self.peers.stop()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc.stop(grace).wait(grace + 1)
        self._data.stop()
        self._http.stop()
        self._stop_publishing()
        if self.nixl is not None:
            self.nixl.close()
        self.store.close()

    def _stop_publishing(self) -> None:
        """Withdraw every entry from the lookup service (peers stop asking at once rather than
        when the lease runs out), then stop the publisher."""
        if self.publisher is None:
            return
        self.store.watch(None)
        if self.store.ready:
            self.publisher.evicted(list(self.store.local_keys()))
        self.publisher.stop(flush_timeout=PUBLISHER_FLUSH_S)

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    def _set_health(self, status) -> None:
        self._health.set("", status)
        self._health.set(SERVICE_NAME, status)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
