"""The client side of NIXL: one agent per client, its receive pool registered once, the node's
agent loaded from NixlHello, and batched one-sided transfers under the node's leases.

get: NixlGet → the node holds the values under a lease and answers their addresses → one READ
of all of them into the client's pooled buffers, whose notification ends the lease. put:
NixlReserve → one WRITE of all values into the ranges the node allocated → NixlCommit with a
checksum per value (the node stores only what matches). A transfer that is not done well
before the lease's TTL is abandoned (``LEASE_USE``): past it the node may reuse the memory.

Any failure raises NixlFailed with a short reason; ``Client`` falls back to the TCP data
channel for that request (transport "auto") or raises (transport "nixl"). The agent is not
thread-safe: every call into it holds ``Agent.lock``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer
from kvpool.cachenode.client.nixl_common import (
    MEM_TYPE,
    Agent,
    has_rdma,
    locality,
    release_message,
)
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import (
    KVPoolError,
    NixlFailed,
    NixlRequired,
    NixlUnavailable,
    NodeLeaving,
    Unreachable,
)
from kvpool.cachenode.core.record import checksum
from kvpool.cachenode.rpc.proto import nixl_pb2 as pb
from kvpool.cachenode.rpc.proto import nixl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SETUP_JOIN_S = 30.0  # how long close() waits for a background setup to finish
LEASE_USE = 0.5  # a transfer must finish within this share of the lease's TTL
POLL_S = 0.0002
BUFFER_WAIT_S = 1.0

SHARED_MEMORY = "shared memory (same host)"
RDMA = "RDMA"
UCX_TCP = "UCX over TCP"


@dataclass(frozen=True)
class NodeNixl:
    """What NixlHello said about a node, and which path NIXL would take to it."""

    enabled: bool
    reason: str
    path: str = ""  # SHARED_MEMORY, RDMA or UCX_TCP

    @property
    def fast(self) -> bool:
        """Whether NIXL beats the TCP data channel on this path (UCX over TCP does not)."""
        return self.enabled and self.path in (SHARED_MEMORY, RDMA)


def path_to(hello: pb.NixlHelloResponse) -> str:
    if hello.locality and hello.locality == locality():
        return SHARED_MEMORY
    if hello.rdma and has_rdma():
        return RDMA
    return UCX_TCP


class NixlLink:
    """A client's NIXL connection to one node. Thread-safe."""

    def __init__(
        self,
        channel: grpc.Channel,
        call: Callable,
        pool: BufferPool,
        *,
        hello: pb.NixlHelloResponse,
    ) -> None:
        """``call(method, request)`` runs a gRPC call with the client's timeout and metadata
        and raises KVPoolError subclasses; ``hello`` is the node's NixlHello answer."""
        self._stub = pb_grpc.NixlTransferStub(channel)
        self._call = call
        self.pool = pool
        self.agent = Agent("client")
        self._pool_base = pool.arena.region.address
        self._pool_registration = self.agent.register(self._pool_base, pool.capacity, "kvpool-receive")
        self._state = threading.Lock()
        self.node_agent = ""
        self.path = ""
        self._load(hello)

    def close(self) -> None:
        with self._state:
            node_agent, self.node_agent = self.node_agent, ""
        with self.agent.lock:
            try:
                if node_agent:
                    self.agent.agent.remove_remote_agent(node_agent)
                self.agent.agent.deregister_memory(self._pool_registration)
            except Exception as exc:  # closing: nothing to do about it
                log.debug("NIXL link close: %s", exc)

    # -- session -------------------------------------------------------------------------------

    def reconnect(self) -> None:
        """Ask the node again (it may have restarted with a new agent) and load its agent."""
        hello = self._call(self._stub.NixlHello, pb.NixlHelloRequest(client=self.agent.name))
        if not hello.enabled:
            raise NixlFailed("node_disabled", f"the node no longer serves NIXL: {hello.reason}")
        self._load(hello)

    def _load(self, hello: pb.NixlHelloResponse) -> None:
        with self._state:
            if hello.agent_name == self.node_agent:
                return
            old = self.node_agent
            with self.agent.lock:  # the old agent stays loaded until the new one loads and checks out
                try:
                    name = self.agent.agent.add_remote_agent(hello.agent_metadata)
                except Exception as exc:
                    raise NixlFailed(
                        "bad_metadata", f"cannot load the node's NIXL agent metadata: {exc}"
                    ) from None
                name = name.decode() if isinstance(name, bytes) else name
                if name != hello.agent_name:
                    self.agent.agent.remove_remote_agent(name)
                    raise NixlFailed(
                        "bad_metadata",
                        f"the node's NIXL metadata names agent {name!r}, not {hello.agent_name!r}",
                    )
                if old:
                    self.agent.agent.remove_remote_agent(old)
                self.agent.agent.make_connection(name)  # connection set up now, not on the first get
            self.node_agent = name
            self.path = path_to(hello)
        log.info("NIXL to agent %s over %s", name, self.path)

    # -- get -----------------------------------------------------------------------------------

    def get_many_into(self, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer]:
        """Read the stored values of ``keys`` into pooled buffers (the caller releases them);
        missing keys are absent from the result."""
        started = time.monotonic()
        lease = self._rpc(self._stub.NixlGet, pb.NixlGetRequest(keys=list(keys), agent_name=self.node_agent))
        found = [
            (key, size, addr)
            for key, size, addr in zip(keys, lease.sizes, lease.addresses, strict=True)
            if size >= 0
        ]
        if len(lease.sizes) != len(keys):
            raise NixlFailed("bad_reply", f"node answered {len(lease.sizes)} sizes for {len(keys)} keys")
        if not lease.lease_id:
            return {key: self.pool.acquire(0) for key, _, _ in found}  # only empty values, if any
        buffers: dict[bytes, PooledBuffer] = {}
        try:
            for key, size, _ in found:
                buf = self._acquire(size)
                buffers[key] = buf
            moving = [(buffers[key], size, addr) for key, size, addr in found if size]
            self._transfer(
                "READ",
                local=[(self._pool_base + buf.offset, size, 0) for buf, size, _ in moving],
                remote=[(addr, size, 0) for _, size, addr in moving],
                notify=release_message(lease.lease_id, lease.token),
                deadline=started + LEASE_USE * lease.ttl_ms / 1000,
            )
        except BaseException:
            for buf in buffers.values():
                buf.release()
            self._release(lease)
            raise
        return buffers

    # -- put -----------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, object]]) -> int:
        """Write non-empty values straight from the caller's memory into room the node
        reserved, then commit them with their checksums; returns how many were stored."""
        started = time.monotonic()
        views = [memoryview(v).cast("B") for _, v in items]
        if any(not len(v) for v in views):
            raise NixlFailed("empty_value", "empty values go over the data channel")
        entries = [pb.NixlPutEntry(key=k, size=len(v)) for (k, _), v in zip(items, views, strict=True)]
        lease = self._rpc(
            self._stub.NixlReserve, pb.NixlReserveRequest(entries=entries, agent_name=self.node_agent)
        )
        if len(lease.addresses) != len(items) or list(lease.sizes) != [len(v) for v in views]:
            self._release(lease)
            raise NixlFailed("bad_reply", "node's reservation does not match the values")
        arrays = [np.frombuffer(v, dtype=np.uint8) for v in views]
        local = [(int(a.ctypes.data), a.nbytes, 0) for a in arrays]
        registration = None
        try:
            outside = _covering([(a, n) for a, n, _ in local if not self._in_pool(a, n)])
            if outside:  # the caller's memory, registered for this transfer only (cheap: UCX caches it)
                with self.agent.lock:
                    registration = self.agent.agent.register_memory(
                        [(a, n, 0, "") for a, n in outside], MEM_TYPE
                    )
            self._transfer(
                "WRITE",
                local=local,
                remote=[(addr, len(v), 0) for addr, v in zip(lease.addresses, views, strict=True)],
                notify=b"",
                deadline=started + LEASE_USE * lease.ttl_ms / 1000,
            )
            sums = [checksum(k, v) for (k, _), v in zip(items, views, strict=True)]
        except BaseException:
            self._release(lease)
            raise
        finally:
            if registration is not None:
                with self.agent.lock:
                    self.agent.agent.deregister_memory(registration)
        reply = self._rpc(
            self._stub.NixlCommit,
            pb.NixlCommitRequest(lease_id=lease.lease_id, token=lease.token, checksums=sums),
        )
        return reply.stored

    # -- internals -----------------------------------------------------------------------------

    def _in_pool(self, address: int, size: int) -> bool:
        return self._pool_base <= address and address + size <= self._pool_base + self.pool.capacity

    def _acquire(self, size: int) -> PooledBuffer:
        try:
            buf = self.pool.acquire(size, timeout=BUFFER_WAIT_S)
        except ValueError as exc:
            raise NixlFailed("value_too_large", str(exc)) from None
        if buf is None:
            raise NixlFailed("no_buffers", "the receive pool stayed full")
        return buf

    def _rpc(self, method, request):
        """A control call; Unreachable (the node is hung or gone) propagates as it is, since
        falling back to the data channel would wait on the same node again."""
        try:
            return self._call(method, request)
        except (NixlFailed, Unreachable):
            raise
        except KVPoolError as exc:
            raise NixlFailed(_reason_of(exc), f"NIXL control call failed: {exc}") from None

    def _release(self, lease: pb.NixlLease) -> None:
        """Best effort: the lease's TTL ends it anyway."""
        if not lease.lease_id:
            return
        try:
            self._call(
                self._stub.NixlRelease, pb.NixlReleaseRequest(lease_id=lease.lease_id, token=lease.token)
            )
        except KVPoolError as exc:
            log.debug("NIXL release of lease %d failed: %s", lease.lease_id, exc)

    def _transfer(self, op: str, *, local: list, remote: list, notify: bytes, deadline: float) -> None:
        """One batched transfer, waited for until ``deadline``; NixlFailed if it does not finish."""
        agent = self.agent.agent
        handle = None
        try:
            with self.agent.lock:
                local_descs = agent.get_xfer_descs(local, MEM_TYPE)
                remote_descs = agent.get_xfer_descs(remote, MEM_TYPE)
                handle = agent.initialize_xfer(op, local_descs, remote_descs, self.node_agent, notify)
                state = agent.transfer(handle)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise NixlFailed("timeout", f"NIXL {op} did not finish within its lease")
                time.sleep(POLL_S)
                with self.agent.lock:
                    state = agent.check_xfer_state(handle)
        except NixlFailed:
            raise
        except Exception as exc:  # nixl raises its own exception types for bad descriptors etc.
            raise NixlFailed("transfer_error", f"NIXL {op} failed: {exc}") from None
        finally:
            if handle is not None:
                with self.agent.lock:
                    try:
                        handle.release()
                    except Exception as exc:
                        log.warning("NIXL: could not release a transfer handle: %s", exc)
        if state != "DONE":
            raise NixlFailed("transfer_error", f"NIXL {op} ended in state {state}")
        if time.monotonic() > deadline:
            raise NixlFailed("timeout", f"NIXL {op} finished after its lease's safe window")


def _covering(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Disjoint (address, size) ranges covering ``ranges``: registering one range twice (the same
    value put under two keys) breaks NIXL's deregistration."""
    merged: list[list[int]] = []
    for start, size in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + size)
        else:
            merged.append([start, start + size])
    return [(start, end - start) for start, end in merged]


def _reason_of(exc: KVPoolError) -> str:
    text = str(exc)
    for marker, reason in (
        ("stale NIXL session", "stale_session"),
        ("is leaving the pool", "leaving"),
        ("no room", "no_room"),
        ("checksum", "checksum"),
        ("expired", "lease_gone"),
    ):
        if marker in text:
            return reason
    return "control_error"


RETRY_SETUP_S = 5.0
WARN_INTERVAL_S = 10.0


class NixlRoute:
    """Whether a client's bulk requests to one node go over NIXL, and the fallback when not.

    ``mode`` "nixl": set up now, raise if NIXL cannot be used, raise on any failure.
    ``mode`` "auto": set up in the background as the client connects (requests use the data
    channel until it is ready), only on a fast path (shared memory, RDMA); any failure of a
    request falls back to the data channel for that request and is counted.
    """

    def __init__(
        self, mode: str, channel: grpc.Channel, call: Callable, pool: Callable[[], BufferPool]
    ) -> None:
        self.mode = mode
        self._channel = channel
        self._call = call
        self._pool = pool
        self._lock = threading.Lock()
        self.link: NixlLink | None = None
        self.reason = "setting up"
        self._closed = False
        self._setup_after = 0.0
        self._warned_at = 0.0
        self.fallbacks = 0
        self._setup_thread: threading.Thread | None = None
        if mode == "nixl":
            self._setup(strict=True)
        else:
            self._start_setup()

    def describe(self) -> str:
        """Which transport bulk requests take now, and why."""
        link = self.link
        if link is not None:
            return f"nixl over {link.path} (agent {link.node_agent})"
        return f"tcp data channel ({self.reason})"

    def _start_setup(self) -> None:
        self._setup_thread = threading.Thread(target=self._setup, name="kvpool-nixl-setup", daemon=True)
        self._setup_thread.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        # An agent being made when the process exits aborts it (its C++ threads): wait for it.
        thread = self._setup_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(SETUP_JOIN_S)
        with self._lock:
            link, self.link = self.link, None
        if link is not None:
            link.close()

    # -- requests: None / False = use the data channel -----------------------------------------

    def get_many_into(self, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer] | None:
        return self._run("get", lambda link: link.get_many_into(keys), _found_bytes)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes] | None:
        def copy_out(link: NixlLink) -> dict[bytes, bytes]:
            found = {}
            for key, buf in link.get_many_into(keys).items():
                with buf:
                    found[key] = bytes(buf.view)
            return found

        return self._run("get", copy_out, _found_bytes)

    def put_many(self, items: Sequence[tuple[bytes, object]]) -> bool:
        if any(not memoryview(v).nbytes for _, v in items):
            return self.mode == "nixl" and self._fail("empty_value", "empty values go over the data channel")
        moved = sum(memoryview(v).nbytes for _, v in items)
        return self._run("put", lambda link: link.put_many(items), lambda _: moved) is not None

    # -- internals -----------------------------------------------------------------------------

    def _run(self, op: str, action: Callable[[NixlLink], object], moved: Callable[[object], int]):
        link = self._ready_link()
        if link is None:
            return None
        for attempt in (0, 1):
            try:
                result = action(link)
            except NixlFailed as exc:
                if exc.reason == "leaving":  # as the data channel would answer: put elsewhere
                    raise NodeLeaving(str(exc)) from None
                if exc.reason == "stale_session" and attempt == 0 and self._reconnect(link):
                    continue  # the node restarted: its new agent is loaded, try once more
                if exc.reason in ("transfer_error", "control_error", "bad_metadata"):
                    self._reconnect(link)
                self._fail(exc.reason, f"NIXL {op}: {exc}")
                return None
            metrics.NIXL_BYTES.labels(op, "client").inc(moved(result))
            return result
        return None

    def _ready_link(self) -> NixlLink | None:
        link = self.link
        if link is not None or self.mode == "nixl" or self._closed:
            return link
        if self._setup_after and time.monotonic() >= self._setup_after:
            self._setup_after = 0.0
            self._start_setup()
        return None

    def _reconnect(self, link: NixlLink) -> bool:
        """Unreachable propagates (as in ``_rpc``): a node that died mid-transfer is down, not
        only its NIXL, and a pool client routes its keys to the next owner or a replica."""
        try:
            link.reconnect()
        except Unreachable:
            raise
        except KVPoolError as exc:
            log.debug("NIXL reconnect failed: %s", exc)
            return False
        return True

    def _fail(self, reason: str, message: str) -> bool:
        """Count a fallback; raise instead in "nixl" mode. Returns False (use the data channel)."""
        if self.mode == "nixl":
            raise NixlRequired(message)
        self.fallbacks += 1
        metrics.NIXL_FALLBACKS.labels(reason).inc()
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL_S:
            self._warned_at = now
            log.warning("%s; this request falls back to the TCP data channel", message)
        return False

    def _setup(self, strict: bool = False) -> None:
        try:
            node, reply = hello(self._channel, self._call)
            if not node.enabled:
                raise NixlUnavailable(node.reason)
            if self.mode == "auto" and not node.fast:
                self.reason = f"NIXL would run {node.path}, slower than the data channel"
                log.info("kvpool client: bulk data over the TCP data channel (%s)", self.reason)
                return
            link = NixlLink(self._channel, self._call, self._pool(), hello=reply)
        except (NixlUnavailable, NixlFailed, KVPoolError) as exc:
            self.reason = f"NIXL unavailable: {exc}"
            if strict:
                raise NixlRequired(self.reason) from None
            self._setup_after = time.monotonic() + RETRY_SETUP_S
            log.info("kvpool client: bulk data over the TCP data channel (%s)", self.reason)
            return
        with self._lock:
            if self._closed:
                link.close()
                return
            self.link = link
            self.reason = ""
        log.info("kvpool client: bulk data over %s", self.describe())


def _found_bytes(found: dict) -> int:
    return sum(b.nbytes if isinstance(b, PooledBuffer) else len(b) for b in found.values())


def hello(channel: grpc.Channel, call: Callable) -> tuple[NodeNixl, pb.NixlHelloResponse]:
    """NixlHello: what the node offers, and the path NIXL would take to it."""
    reply = call(pb_grpc.NixlTransferStub(channel).NixlHello, pb.NixlHelloRequest(client="kvpool-python"))
    if not reply.enabled:
        return NodeNixl(False, reply.reason or "the node does not serve NIXL"), reply
    return NodeNixl(True, "", path_to(reply)), reply
