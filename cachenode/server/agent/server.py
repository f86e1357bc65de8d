"""`AgentServer`: the vLLM pod's sidecar (`kvpool agent`).

It is a cache node in all its serving (the CacheNode gRPC API, the TCP data channel, NIXL where
available), so a peer agent reads from it with the plain `NodeConnection` and a connector outside
the pod with the plain `Client` — both see what its arena holds, nothing more. What makes it an
agent:
- its L1 arena is a file under --arena-dir that the connector in the pod maps; the `Agent` gRPC
  service (service.py) hands out arena offsets under leases (the NIXL leases' code,
  transport/nixl_leases.py), so chunk bytes never cross gRPC inside the pod, and the arena — the
  agent's memory, not vLLM's — outlives a restart of the vLLM container;
- on a local miss it asks the lookup service which peer agent holds the chunk and fetches from
  it, else from the cache nodes (sources.py), and keeps what it fetched;
- it publishes what its arena admits and evicts to the lookup service (the node's `Publisher`
  wiring, holder kind "agent") and writes the chunks its connector stores through to the cache
  nodes in the background (pool.py).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from kvpool.cachenode.client import arena_file
from kvpool.cachenode.client.buffers import BufferPool
from kvpool.cachenode.client.connection import ConnectOptions
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.core.settings import AgentSettings
from kvpool.cachenode.core.sizes import format_size
from kvpool.cachenode.rpc.proto import agent_pb2, agent_pb2_grpc
from kvpool.cachenode.server.agent.peers import PeerLinks
from kvpool.cachenode.server.agent.pool import PoolLink
from kvpool.cachenode.server.agent.sources import Sources
from kvpool.cachenode.server.nixl_leases import TransferLease, TransferLeases
from kvpool.cachenode.server.node import CacheNode
from kvpool.cachenode.server.tiers.store import TieredStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.25
IO_THREADS = 16
PREFETCH_THREADS = 2
RECEIVE_BUFFER_BYTES = 256 * 1024 * 1024


class AgentServer(CacheNode):
    """Binds every port and creates the arena in the constructor; serves after start()."""

    kind = "agent"

    def __init__(self, settings: AgentSettings) -> None:
        settings.validate()
        self.agent_settings = settings
        self.arena_id = secrets.randbits(63) | 1
        self.arena_path = arena_file.arena_path(settings.arena_dir, settings.agent_id)
        arena_file.remove_stale(self.arena_path)
        store = TieredStore(
            settings.memory,
            high_watermark=settings.high_watermark,
            low_watermark=settings.low_watermark,
            arena_path=str(self.arena_path),
        )
        self._claim: arena_file.ArenaClaim | None = None
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="kvpool-agent-io")
        self._prefetch = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="kvpool-agent-prefetch")
        self._fetch_lock = threading.Lock()
        self._fetching: dict[bytes, threading.Event] = {}
        self._sweeping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="kvpool-agent-leases", daemon=True)
        self.sources: Sources | None = None
        self.pool: PoolLink | None = None
        self._buffers: BufferPool | None = None
        self._buffers_lock = threading.Lock()
        try:
            self._claim = arena_file.ArenaClaim(
                self.arena_path, store.memory.arena_bytes, settings.arena_mode
            )
            self.arena_identity = self._claim.identity()
            self.leases = TransferLeases(
                store, settings.nixl_lease_ttl, transport="arena", on_commit=self._committed
            )
            node = settings.node()
            node.lookup_url = settings.lookup_url  # the node's Publisher wiring, as kind "agent"
            super().__init__(node, store=store)
            self._data.agent = self  # the connector's Locate/Unpin on the data channel too
            self.sources = self._make_sources(settings)
        except BaseException:
            self._close_own()
            store.close()
            raise

    def _make_sources(self, s: AgentSettings) -> Sources:
        token = s.auth_token
        ca = str(s.tls_ca_file) if s.tls_ca_file else None

        def options(tls: bool) -> ConnectOptions:
            return ConnectOptions.build(
                tls=tls, timeout=s.fetch_timeout, token=token, tls_ca_file=ca, transport="auto"
            )

        options(False)  # a bad --tls-ca-file fails here, at start
        if s.pool_url:
            self.pool = PoolLink(
                s.pool_url,
                token=token,
                timeout=s.fetch_timeout,
                tls_ca_file=ca,
                queue_items=s.tier_queue_items,
                queue_bytes=s.tier_queue_size,
                executor=self._io,
            )
        lookup = (
            LookupClient(s.lookup_url, token=token, timeout=s.fetch_timeout, tls_ca_file=ca)
            if s.lookup_url
            else None
        )
        return Sources(
            self.node_id, lookup=lookup, peers=PeerLinks(options, self._receive_buffers), pool=self.pool,
            executor=self._io,
        )  # fmt: skip

    def _receive_buffers(self) -> BufferPool:
        with self._buffers_lock:
            if self._buffers is None:
                self._buffers = BufferPool(RECEIVE_BUFFER_BYTES, prefault=False)
            return self._buffers

    # -- CacheNode hooks ---------------------------------------------------------------------

    def _add_services(self, server: grpc.Server) -> None:
        from kvpool.cachenode.server.agent.service import AgentService

        agent_pb2_grpc.add_AgentServicer_to_server(AgentService(self), server)

    def _service_names(self) -> tuple[str, ...]:
        return (agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,)

    def start(self, wait_ready: bool = True) -> None:
        self._sweeper.start()
        super().start(wait_ready)

    def summary(self) -> str:
        s = self.agent_settings
        return (
            f"kvpool agent {self.node_id} on {self.url} (data port {self.data_port}, http {self.http_port}): "
            f"arena {format_size(s.memory)} at {self.arena_path}, "
            f"lookup {s.lookup_url or 'off'}, pool {s.pool_url or 'none (peers only)'}"
            + (f", NIXL agent {self.nixl.name}" if self.nixl is not None else "")
            + (", auth on" if s.auth_token else "")
            + (", TLS on" if s.tls else "")
        )

    def stats(self) -> dict:
        out = super().stats()
        out["agent"] = {
            "arena_path": str(self.arena_path),
            "arena_bytes": self.store.memory.arena_bytes,
            "arena_leases": len(self.leases),
            "arena_leases_expired": self.leases.expired,
            "sources": self.sources.stats() if self.sources is not None else {},
            "pool": self.pool.stats() if self.pool is not None else None,
        }
        return out

    def stop(self, grace: float = 2.0, handoff: bool = False) -> None:
        if self._stopped.is_set():
            return
        super().stop(grace, handoff=False)  # flushes nothing to peers: the arena is the cache
        self._close_own()

    def _close_own(self) -> None:
        self._sweeping.set()
        if self._sweeper.is_alive():
            self._sweeper.join(timeout=2)
        if hasattr(self, "leases"):
            self.leases.clear()
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        if self.pool is not None:
            self.pool.close()
        if self.sources is not None:
            self.sources.peers.close()
            if self.sources.lookup is not None:
                self.sources.lookup.close()
        self._io.shutdown(wait=False, cancel_futures=True)
        with self._buffers_lock:
            if self._buffers is not None:
                self._buffers.close()
                self._buffers = None
        if self._claim is not None:
            self._claim.close()
            self._claim = None

    # -- what the connector asks (service.py translates) -------------------------------------

    def locate(self, keys: list[bytes], lease_ms: int, lease_id: int) -> tuple[int, int, int]:
        """(leading keys deliverable, lease id or 0, of them already in the arena). Local keys
        are pinned under the lease, and the pool pins what it will deliver; what peers or the
        pool will deliver is fetched into the arena in the background right away."""
        local_lease = 0
        if lease_ms:
            lease_id = lease_id or secrets.randbits(63) | 1
            local, local_lease = self.store.lease_prefix(keys, lease_ms / 1000, lease_id)
        else:
            local = self.store.prefix_hits(keys)
        if local == len(keys) or self.sources is None:
            return local, local_lease, local
        more, pool_pinned = self.sources.count(keys[local:], lease_ms, lease_id)
        if more:
            with contextlib.suppress(RuntimeError):  # shutting down
                self._prefetch.submit(self.bring, keys[local : local + more])
        return local + more, lease_id if (local_lease or pool_pinned) else 0, local

    def unpin(self, lease_id: int, keys: Sequence[bytes] | None) -> int:
        count = self.store.release(lease_id, keys)
        if self.pool is not None:
            self.pool.release(lease_id, keys)
        return count

    def acquire(self, keys: list[bytes]) -> TransferLease:
        """Hold `keys` in the arena under a get lease, fetching what it lacks first."""
        missing = [k for k in dict.fromkeys(keys) if not self.store.contains(k)]
        if missing:
            self.bring(missing)
        return self.leases.open_get(keys)

    def bring(self, keys: Sequence[bytes]) -> int:
        """Fetch `keys` from peers or the pool into the arena (published as admitted); a key
        another call is already fetching is waited for, not fetched twice. Returns how many
        this call stored."""
        if self.sources is None:
            return 0
        mine: list[bytes] = []
        waits: list[threading.Event] = []
        with self._fetch_lock:
            for key in keys:
                if self.store.contains(key):
                    continue
                event = self._fetching.get(key)
                if event is None:
                    self._fetching[key] = threading.Event()
                    mine.append(key)
                else:
                    waits.append(event)
        stored = 0
        started = time.perf_counter()
        try:
            if mine:
                got = self.sources.fetch(mine)
                size = 0
                for key, buf in got.items():
                    with buf:
                        size += buf.nbytes
                        stored += bool(self.store.put(key, buf.view))  # a copy into the arena
                if got:
                    log.info(
                        "Fetched %d of %d chunks (%s) in %.1f ms",
                        len(got), len(mine), format_size(size), 1000 * (time.perf_counter() - started),
                    )  # fmt: skip
        finally:
            with self._fetch_lock:
                for key in mine:
                    self._fetching.pop(key).set()
        deadline = time.monotonic() + self.agent_settings.fetch_timeout
        for event in waits:
            event.wait(max(0.0, deadline - time.monotonic()))
        return stored

    def _committed(self, keys: list[bytes], values: list) -> None:
        """The connector stored these: write them through to the cache nodes."""
        if self.pool is not None:
            for key, value in zip(keys, values, strict=True):
                self.pool.write_through(key, value)

    def _sweep_loop(self) -> None:
        while not self._sweeping.wait(SWEEP_INTERVAL_S):
            try:
                self.leases.sweep()
            except Exception:  # the sweeper must not die: leases would never expire
                log.exception("sweeping arena leases failed")
