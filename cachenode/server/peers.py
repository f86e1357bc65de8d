"""A node's view of its pool: who the other members are, and whether they answer.

The node learns its peers from `--peers` (a comma list of node URLs or host:port, or one DNS name
that resolves to every member — the headless Service, re-resolved every few seconds) and from
peers that announce themselves. Every second it asks each peer for its members (`Members`, sending
itself as the caller, so the peer learns of it too); a peer that fails twice in a row is marked
down by a circuit breaker (tiers/breaker.py) and probed again after a growing wait. A peer that
said it was leaving and then stops answering is forgotten at once; one that is down for
FORGET_AFTER_S is forgotten too.

The ready members (this node included) form the pool's view. When it changes, the node keeps the
previous view for clients (`Members.previous`) and calls `on_change(old, new)`, which hands
chunks to their new owners (node.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.errors import KVPoolError
from kvpool.cachenode.core.urls import parse_peers
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
RESOLVE_INTERVAL_S = 5.0
FORGET_AFTER_S = 300.0


def resolve(host: str, port: int) -> set[tuple[str, int]]:
    """Every address a peer name stands for (a headless Service name resolves to every pod)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return {(host, port)}
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.debug("cannot resolve peer %s: %s", host, exc)
        return set()
    return {(info[4][0], port) for info in infos}


def peer_host(context_peer: str) -> str:
    """The IP in a gRPC peer string such as 'ipv4:10.0.0.7:51234' or 'ipv6:[::1]:5123'."""
    kind, _, rest = context_peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return ""


@dataclass
class _Peer:
    info: ms.MemberInfo
    conn: NodeConnection
    breaker: CircuitBreaker
    last_seen: float

    @property
    def state(self) -> str:
        return self.info.state if self.breaker.state is State.CLOSED else ms.DOWN


class PeerTracker:
    """Thread-safe. `start()` runs the probe loop; `members_reply()` answers `Members`."""

    def __init__(
        self,
        self_info: Callable[[], ms.MemberInfo],
        *,
        peers: str,
        default_port: int,
        replication_factor: int,
        options: ConnectOptions,
        on_change: Callable[[frozenset[str], frozenset[str]], None] | None = None,
        interval: float = PROBE_INTERVAL_S,
    ) -> None:
        self._self_info = self_info
        self._spec = parse_peers(peers, default_port)
        self.replication_factor = replication_factor
        self._options = options
        self._on_change = on_change
        self._interval = interval
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._conns: dict[tuple[str, int], NodeConnection] = {}
        self._own_addresses: set[tuple[str, int]] = set()
        self._resolved: set[tuple[str, int]] = set()
        self._names: dict[tuple[str, int], str] = {}  # resolved address -> the peer name it came from
        self._resolved_at = -RESOLVE_INTERVAL_S
        self._view: frozenset[str] = frozenset()
        self._previous: frozenset[str] = frozenset()
        self._changed_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvpool-peers", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=PROBE_TIMEOUT_S + 1)
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for conn in conns:
            conn.close()

    # -- what the node serves ------------------------------------------------------------
    def members_reply(self) -> pb.MembersResponse:
        me = self._self_info()
        with self._lock:
            peers = [p.info.with_state(p.state).to_pb() for p in self._peers.values()]
            previous = sorted(self._previous) if self._changed_at else []
            ago = time.monotonic() - self._changed_at if self._changed_at else 0.0
        return pb.MembersResponse(
            node=me.to_pb(),
            peers=peers,
            replication_factor=self.replication_factor,
            previous=previous,
            changed_s_ago=ago,
        )

    def announced(self, caller: pb.Member, context_peer: str) -> None:
        """A peer probing us said who it is: learn of it (or of its new state) at once."""
        me = self._self_info()
        if not caller.node_id or caller.node_id == me.node_id or not caller.grpc_port:
            return
        info = ms.MemberInfo.from_pb(caller, peer_host(context_peer))
        if not info.host:
            return
        self._learn(info, reached=True)
        self.update_view()

    def peers(self) -> dict[str, ms.MemberInfo]:
        """Every known peer with the state this node sees it in."""
        with self._lock:
            return {n: p.info.with_state(p.state) for n, p in self._peers.items()}

    def connection(self, node_id: str) -> NodeConnection | None:
        with self._lock:
            peer = self._peers.get(node_id)
            return peer.conn if peer else None

    @property
    def view(self) -> frozenset[str]:
        """The ready members, this node included when it is ready."""
        return self._view

    def announce_leaving(self) -> None:
        """Tell every peer now that this node is leaving, instead of waiting for their probes."""
        me = self._self_info().to_pb()
        with self._lock:
            conns = [p.conn for p in self._peers.values() if p.breaker.state is State.CLOSED]
        calls = []
        for conn in conns:
            with contextlib.suppress(KVPoolError):
                calls.append(conn.members_async(caller=me, timeout=PROBE_TIMEOUT_S))
        for call in calls:
            with contextlib.suppress(KVPoolError):
                call.result()

    def probe_now(self) -> None:
        """One probe round (the loop calls it every interval; tests and start-up call it too)."""
        targets = self._targets()
        me = self._self_info().to_pb()
        calls = []
        for address, conn in targets:
            peer = self._peer_at(address)
            if peer is not None and not peer.breaker.allow():
                continue  # down: wait for the breaker's half-open probe
            try:
                calls.append((address, peer, conn.members_async(caller=me, timeout=PROBE_TIMEOUT_S)))
            except KVPoolError:
                continue
        for address, peer, call in calls:
            try:
                reply = call.result()
            except KVPoolError as exc:
                if peer is not None:
                    self._failed(peer, exc)
                continue
            report = ms.Report.from_pb(reply, address[0])
            if report.node.node_id == me.node_id:
                with self._lock:
                    self._own_addresses.add(address)
                continue
            self._learn(report.node, reached=True, address=address)
            for other in report.peers:
                if other.node_id != me.node_id and other.state != ms.DOWN:
                    self._learn(other, reached=False)
        self._forget_stale()
        self.update_view()

    # -- internals -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_now()
            except Exception:  # never let the thread die: the view depends on it
                log.exception("probing peers failed")
            self._stop.wait(self._interval)

    def _targets(self) -> list[tuple[tuple[str, int], NodeConnection]]:
        now = time.monotonic()
        if now - self._resolved_at >= RESOLVE_INTERVAL_S:
            resolved: set[tuple[str, int]] = set()
            for host, port in self._spec:
                addresses = resolve(host, port)
                resolved |= addresses
                self._names.update((a, host) for a in addresses if a[0] != host)
            self._resolved, self._resolved_at = resolved, now
        with self._lock:
            addresses = set(self._resolved) | {p.info.address for p in self._peers.values()}
            addresses -= self._own_addresses
            return [(a, self._conn(a)) for a in sorted(addresses)]

    def _conn(self, address: tuple[str, int]) -> NodeConnection:
        conn = self._conns.get(address)
        if conn is None:
            # An address the peers' name resolved to is verified (TLS) against that name.
            name = self._names.get(address)
            conn = self._conns[address] = NodeConnection(
                address[0], address[1], self._options, server_name=name
            )
        return conn

    def _peer_at(self, address: tuple[str, int]) -> _Peer | None:
        with self._lock:
            return next((p for p in self._peers.values() if p.info.address == address), None)

    def _learn(self, info: ms.MemberInfo, *, reached: bool, address: tuple[str, int] | None = None) -> None:
        """`reached`: the member itself answered (its report about itself is the truth)."""
        if address is not None and not info.host:
            info = ms.MemberInfo(info.node_id, address[0], *_tail(info))
        with self._lock:
            peer = self._peers.get(info.node_id)
            if peer is None:
                if not reached and info.state == ms.LEAVING:
                    return
                peer = _Peer(info, self._conn(info.address), self._breaker(info.node_id), time.monotonic())
                self._peers[info.node_id] = peer
                log.info("pool member %s at %s:%d (%s)", info.node_id, info.host, info.grpc_port, info.state)
            elif reached or info.incarnation > peer.info.incarnation:
                if info.incarnation != peer.info.incarnation or info.address != peer.info.address:
                    peer.conn = self._conn(info.address)
                    peer.conn.forget_session()
                if info.state != peer.info.state:
                    log.info("pool member %s is %s", info.node_id, info.state)
                peer.info = info
            else:
                return
            if reached:
                peer.last_seen = time.monotonic()
        if reached:
            peer.breaker.record_success()

    def _failed(self, peer: _Peer, exc: Exception) -> None:
        peer.breaker.record_failure()
        log.debug("probe of %s failed: %s", peer.info.node_id, exc)
        if peer.info.state == ms.LEAVING:  # it said it was going, and now it is gone
            self._forget(peer.info.node_id, "left")

    def _forget_stale(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [
                n
                for n, p in self._peers.items()
                if p.breaker.state is not State.CLOSED and now - p.last_seen > FORGET_AFTER_S
            ]
        for node in stale:
            self._forget(node, f"down for over {FORGET_AFTER_S:.0f} s")

    def _forget(self, node: str, why: str) -> None:
        with self._lock:
            peer = self._peers.pop(node, None)
            if peer is None:
                return
            used = {p.info.address for p in self._peers.values()} | self._resolved
            if peer.info.address not in used:
                conn = self._conns.pop(peer.info.address, None)
                if conn is not None:
                    conn.close()
        log.info("pool member %s forgotten (%s)", node, why)

    def _breaker(self, node: str) -> CircuitBreaker:
        def on_change(state: State) -> None:
            if state is State.OPEN:
                log.warning("pool member %s does not answer; marked down", node)
            elif state is State.CLOSED:
                log.info("pool member %s answers again", node)

        return CircuitBreaker(
            failure_threshold=2, reset_timeout=1.0, max_reset_timeout=10.0, on_change=on_change
        )

    def update_view(self) -> None:
        """Recompute the ready members; on a change, remember the old view and call on_change."""
        me = self._self_info()
        with self._lock:
            view = {n for n, p in self._peers.items() if p.state == ms.READY}
            for state in (ms.READY, ms.STARTING, ms.LEAVING, ms.DOWN):
                metrics.POOL_MEMBERS.labels(state).set(
                    sum(1 for p in self._peers.values() if p.state == state) + (me.state == state)
                )
            if me.state == ms.READY:
                view.add(me.node_id)
            new = frozenset(view)
            old = self._view
            if new == old:
                return
            self._view = new
            if old:
                self._previous, self._changed_at = old, time.monotonic()
        if old:
            log.info("pool view of %s: %s -> %s", me.node_id, ",".join(sorted(old)), ",".join(sorted(new)))
        if self._on_change is not None and old:
            self._on_change(old, new)


def _tail(info: ms.MemberInfo) -> tuple:
    return info.grpc_port, info.data_port, info.http_port, info.state, info.incarnation
