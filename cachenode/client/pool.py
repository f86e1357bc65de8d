"""`Client`: the Python API of a kvpool pool — one node, `kvpool up`, or many nodes as one cache.

Like Memcached and Redis Cluster clients, it routes each key itself, in one hop: it learns the
members from any node it is given (a comma-separated list of node URLs, or one URL of a node or
of the pool's Service), places each key by rendezvous hashing over the members' stable ids
(placement.py) and talks to the owners directly, one request per node, in parallel. Per node it
uses a `NodeConnection` (connection.py).

Members that fail are marked down by a circuit breaker (tiers/breaker.py): their keys go to the
next node in rendezvous order at once, and a background thread probes them (half-open) until they
answer again; the member list itself is refreshed every few seconds and after errors.

Handoff: the client remembers the views (sets of members) of the last few minutes, and nodes
report the view before their last change. A read whose owner misses asks the owners under those
earlier views before it reports a miss, and copies what it finds to the new owner, so adding a
node turns no stored key into a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer
from kvpool.cachenode.client.connection import (
    DATA_CONNECTIONS,
    DEFAULT_RECEIVE_BUFFER_BYTES,
    DEFAULT_TIMEOUT_S,
    ConnectOptions,
    NodeConnection,
    NodeLeaving,
    Unimplemented,
    Value,
)
from kvpool.cachenode.client.nixl import NixlRequired
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.errors import InvalidRequest, KVPoolError, Unauthenticated, Unavailable
from kvpool.cachenode.core.leases import MAX_TTL_S
from kvpool.cachenode.core.placement import Placement
from kvpool.cachenode.core.urls import parse_url, parse_urls
from kvpool.cachenode.core.validation import check_key
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 5.0
DEFAULT_HANDOFF_WINDOW_S = 300.0
MAX_PREVIOUS_VIEWS = 4
SEED_GRACE_S = 0.25  # after the first seed answers, how long the others get to answer too
MIN_REFRESH_GAP_S = 0.5  # refreshes triggered by errors come at most this often
PROBE_TIMEOUT_S = 2.0
BREAKER_RESET_S = 1.0
BREAKER_MAX_RESET_S = 10.0
PARALLEL_CALLS = 16
MAX_DEFERRED_RELEASES = 1024  # the oldest go first (they expire on their own)

__all__ = ["Client", "parse_url", "parse_urls"]


class _Member:
    """A member as this client sees it: what the pool says, plus our own breaker."""

    __slots__ = ("breaker", "conn", "info")

    def __init__(self, info: ms.MemberInfo, conn: NodeConnection, breaker: CircuitBreaker) -> None:
        self.info = info
        self.conn = conn
        self.breaker = breaker

    @property
    def up(self) -> bool:
        return self.breaker.state is State.CLOSED

    def summary(self) -> dict:
        return {
            "node_id": self.info.node_id,
            "url": self.conn.url,
            "state": self.info.state if self.up or self.info.state == ms.DOWN else "unreachable",
            "incarnation": self.info.incarnation,
            "data_port": self.info.data_port,
            "http_port": self.info.http_port,
            "breaker": str(self.breaker.state),
        }


class _Views:
    """The current placement and the earlier ones still inside the handoff window."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self.current: Placement | None = None
        self._previous: list[tuple[Placement, float]] = []  # (view, replaced at), newest first

    def observe(self, nodes: tuple[str, ...]) -> Placement:
        current = self.current
        if current is not None and current.nodes == nodes:
            return current
        with self._lock:
            if self.current is None or self.current.nodes != nodes:
                if self.current is not None:
                    log.info(
                        "pool view changed: %s -> %s",
                        ",".join(self.current.nodes) or "-",
                        ",".join(nodes) or "-",
                    )
                    self._remember(self.current, self._clock())
                self.current = Placement(nodes)
            return self.current

    def remember(self, nodes: Iterable[str], replaced_s_ago: float) -> None:
        """An earlier view a node reported (so a client started after a change knows it too)."""
        if replaced_s_ago <= 0 or replaced_s_ago >= self.window:
            return
        with self._lock:
            self._remember(Placement(nodes), self._clock() - replaced_s_ago)

    def previous(self) -> tuple[Placement, ...]:
        if not self._previous:
            return ()
        now = self._clock()
        with self._lock:
            self._previous = [(v, t) for v, t in self._previous if now - t < self.window]
            return tuple(v for v, _ in self._previous if v != self.current)

    def _remember(self, view: Placement, at: float) -> None:
        if not view.nodes:
            return
        kept = [(v, t) for v, t in self._previous if v != view]
        kept.append((view, at))
        kept.sort(key=lambda vt: -vt[1])
        self._previous = kept[:MAX_PREVIOUS_VIEWS]


@dataclass(frozen=True)
class _Routing:
    """One request's picture of the pool."""

    members: dict[str, _Member]
    current: Placement  # members that take new keys
    readable: frozenset[str]  # members that may be read from (ready or leaving, breaker closed)
    previous: tuple[Placement, ...]
    replicas: int

    def owners(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Each key's owners: the `replicas` best members that take new keys."""
        return self.current.owners_many(keys, self.replicas)

    def candidates(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Where each key may be, in the order to ask: its owners, then its owners in earlier
        views (those still readable)."""
        out = self.owners(keys)
        for view in self.previous:
            for found, earlier in zip(out, view.owners_many(keys, self.replicas), strict=True):
                found.extend(n for n in earlier if n not in found and n in self.readable)
        return out


class Client:
    """Thread-safe; reuse one per process. Use as a context manager or call close().

    `url`: `grpc://host:port` of a node, `kvpool up` or the pool's Service, or a comma-separated
    list of node URLs (`grpcs://` for TLS pools). `replication_factor`: nodes holding each chunk
    (default: env KVPOOL_REPLICATION_FACTOR, else what the pool's nodes were started with).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        use_data_channel: bool = True,
        data_connections: int = DATA_CONNECTIONS,
        tls_ca_file: str | None = None,
        replication_factor: int | None = None,
        refresh_interval: float = DEFAULT_REFRESH_S,
        handoff_window: float = DEFAULT_HANDOFF_WINDOW_S,
        transport: str = "auto",
        receive_buffer_bytes: int = DEFAULT_RECEIVE_BUFFER_BYTES,
    ) -> None:
        """`transport`: "auto" moves bulk bytes to each node over NIXL where that is the fast path
        (same host, RDMA), set up in the background as the client connects and falling back to
        the TCP data channel per request on any NIXL failure; "nixl" requires NIXL; "grpc" never
        uses it. `receive_buffer_bytes` sizes the pool of receive buffers (`buffers`) that
        `get_many_into` and NIXL READs fill, shared by every node."""
        self.url = url
        self._seeds, tls = parse_urls(url)
        self._options = ConnectOptions.build(
            tls=tls,
            timeout=timeout,
            token=token,
            use_data_channel=use_data_channel,
            data_connections=data_connections,
            tls_ca_file=tls_ca_file,
            transport=transport,
        )
        self._receive_buffer_bytes = receive_buffer_bytes
        self._buffers: BufferPool | None = None
        self._buffers_lock = threading.Lock()
        # Releases no member could take (all down or failing): sent again once one answers, so a
        # lease ends when its reader is done, not at its expiry. (monotonic time, lease id, keys)
        self._deferred_releases: list[tuple[float, int, list[bytes] | None]] = []
        self._deferred_lock = threading.Lock()
        self._replicas_wanted = _replication_factor(replication_factor)
        self._pool_replicas = 1
        self._refresh_interval = refresh_interval
        self._views = _Views(handoff_window)
        self._lock = threading.Lock()  # guards _members, _conns
        self._bootstrap_lock = threading.Lock()
        self._members: dict[str, _Member] = {}
        self._conns: dict[tuple[str, int], NodeConnection] = {}
        self._retired: list[tuple[NodeConnection, float]] = []  # closed a while after replacement
        self._executor: ThreadPoolExecutor | None = None
        self._refresher: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._last_refresh = 0.0
        self.handoff_copies = 0  # values found at an earlier owner and copied to the new one
        if transport == "nixl":  # set up now: a pool that cannot do it is an error here, not later
            self._ensure_members()

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join(timeout=self._options.timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            conns = [*self._conns.values(), *(c for c, _ in self._retired)]
            self._conns.clear()
            self._retired.clear()
            self._members = {}
        for conn in conns:
            conn.close()
        with self._buffers_lock:
            if self._buffers is not None:
                self._buffers.close()
                self._buffers = None

    @property
    def buffers(self) -> BufferPool:
        """The page-aligned receive buffers `get_many_into` fills (registered with NIXL when on)."""
        with self._buffers_lock:
            if self._buffers is None:
                self._buffers = BufferPool(self._receive_buffer_bytes, prefault=False)
            return self._buffers

    @property
    def transport_in_use(self) -> str:
        """Which transport bulk requests take now, and why: one line, or one per member."""
        members = sorted(self._ensure_members().items())
        if len(members) == 1:
            return members[0][1].conn.transport_in_use
        return "; ".join(f"{node}: {m.conn.transport_in_use}" for node, m in members)

    @property
    def replication_factor(self) -> int:
        return self._replicas_wanted or self._pool_replicas

    # -- public API ----------------------------------------------------------------------
    def put(self, key: bytes, value: Value) -> None:
        self.put_many({key: value})

    def put_many(self, mapping: Mapping[bytes, Value] | Iterable[tuple[bytes, Value]]) -> None:
        """Write each value to its owners in parallel. Raises Unavailable if some value reached
        no node; a value written to fewer than its R owners is not an error (it is still held)."""
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        items = [(check_key(k), v) for k, v in pairs]
        for _, value in items:
            memoryview(value)  # a TypeError for non-bytes values before anything is sent
        if not items:
            return
        routing = self._routing()
        written: dict[int, set[str]] = defaultdict(set)
        tried: dict[int, set[str]] = defaultdict(set)
        errors: list[str] = []
        todo = list(range(len(items)))
        for _ in range(1 + len(routing.members)):
            groups: dict[str, list[int]] = defaultdict(list)
            for i, owners in zip(todo, routing.owners([items[i][0] for i in todo]), strict=True):
                for node in owners:
                    if node not in written[i] and node not in tried[i]:
                        groups[node].append(i)
            if not groups:
                break
            results, failed = self._fan_out(
                routing, groups, lambda m, idx: m.conn.put_many([items[i] for i in idx])
            )
            for node, idx in groups.items():
                for i in idx:
                    tried[i].add(node)
                    if node in results:
                        written[i].add(node)
            if not failed:
                break
            errors.extend(f"{node}: {exc}" for node, exc in failed.items())
            routing = self._routing(require_writable=False)
            todo = [i for i in todo if len(written[i]) < routing.replicas]
        lost = sum(1 for i in range(len(items)) if not written[i])
        if lost:
            raise Unavailable(
                f"{lost} of {len(items)} values reached no node of {self.url}: {'; '.join(errors)}"
            )

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        return self._get(keys, into=False)

    def get_many_into(self, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer]:
        """Receive values straight into buffers of `buffers` (NIXL READ or the data channel's
        recv_into); missing keys are absent. Release each buffer (or use it as a context
        manager) when done: the pool is bounded."""
        return self._get(keys, into=True)

    def _get(self, keys: Sequence[bytes], *, into: bool) -> dict:
        """Values from their owners (then earlier owners, copying back what those had)."""
        keys = list(dict.fromkeys(check_key(k) for k in keys))
        if not keys:
            return {}
        found: dict = {}
        try:
            return self._get_found(keys, into, found)
        except BaseException:
            if into:  # pooled buffers already filled go back to the pool
                for buf in found.values():
                    buf.release()
            raise

    def _get_found(self, keys: list[bytes], into: bool, found: dict) -> dict:
        routing = self._routing(require_writable=False)
        tried: dict[bytes, set[str]] = defaultdict(set)
        missed: dict[bytes, list[str]] = defaultdict(list)  # nodes that answered "not here"
        candidates = dict(zip(keys, routing.candidates(keys), strict=True))
        todo = keys
        for _ in range(2 + 2 * len(routing.members)):
            groups: dict[str, list[bytes]] = defaultdict(list)
            for key in todo:
                node = next((n for n in candidates[key] if n not in tried[key]), None)
                if node is not None:
                    groups[node].append(key)
            if not groups:
                break
            results, failed = self._fan_out(
                routing, groups, lambda m, ks: m.conn.get_many_into(ks) if into else m.conn.get_many(ks)
            )
            for node, ks in groups.items():
                got = results.get(node)
                for key in ks:
                    tried[key].add(node)
                    if got is None:
                        continue
                    value = got.get(key)
                    if value is None:
                        missed[key].append(node)
                    else:
                        found[key] = value
            todo = [k for k in todo if k not in found]
            if failed and todo:
                routing = self._routing(require_writable=False)
                candidates.update(zip(todo, routing.candidates(todo), strict=True))
        copies = {k: (found[k].view if into else found[k]) for k in missed if k in found}
        self._copy_to_new_owners(routing, copies, missed)
        return {k: found[k] for k in keys if k in found}

    def get_into(self, key: bytes, buffer) -> int | None:
        """Receive a value straight into `buffer` (writable, large enough); its size, or None."""
        key = check_key(key)
        routing = self._routing(require_writable=False)
        tried: set[str] = set()
        missed: list[str] = []
        for _ in range(2 + 2 * len(routing.members)):
            node = next((n for n in routing.candidates([key])[0] if n not in tried), None)
            if node is None:
                return None
            tried.add(node)
            member = routing.members[node]
            try:
                size = member.conn.get_into(key, buffer)
            except Unavailable as exc:
                self._failed(member, exc)
                routing = self._routing(require_writable=False)
                continue
            member.breaker.record_success()
            if size is None:
                missed.append(node)
                continue
            if missed:
                value = bytes(memoryview(buffer).cast("B")[:size])
                self._copy_to_new_owners(routing, {key: value}, {key: missed})
            return size
        return None

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are stored anywhere in the pool."""
        return self._prefix(keys, None)

    def _prefix(
        self, keys: Sequence[bytes], lease: tuple[int, int] | None, pinned: list[bool] | None = None
    ) -> int:
        """prefix_hits; with ``lease`` = (ms, id) the owners also pin what they hold (and append
        to ``pinned`` when they did)."""
        keys = [check_key(k) for k in keys]
        n = len(keys)
        if not n:
            return 0
        routing = self._routing(require_writable=False)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, owners in enumerate(routing.owners(keys)):
            if owners:
                groups[owners[0]].append(i)
        known: dict[int, bool] = {}
        asked: dict[int, str] = {}

        def ask(member: _Member, idx: list[int]) -> int:
            sub = [keys[i] for i in idx]
            if lease is None:
                return member.conn.prefix_hits(sub)
            count, node_lease = member.conn.lease_prefix(sub, lease[0], lease[1])
            if node_lease and pinned is not None:
                pinned.append(True)
            return count

        counts, failed = self._fan_out(routing, groups, ask)
        first_miss = n if groups else 0
        for node, idx in groups.items():
            if node in counts:
                count = counts[node]
                for j, i in enumerate(idx[: count + 1]):
                    known[i] = j < count
                    asked[i] = node
                if count < len(idx):
                    first_miss = min(first_miss, idx[count])
            else:
                first_miss = min(first_miss, idx[0])
        if first_miss == n:
            return n
        if failed:
            routing = self._routing(require_writable=False)
        # A second round only where a key may also be elsewhere: replicas, earlier owners, or
        # the new owner of a node that just failed. Nothing to ask about the first miss: done.
        if not [c for c in routing.candidates([keys[first_miss]])[0] if c != asked.get(first_miss)]:
            return first_miss
        present = self._present_elsewhere(routing, keys, range(first_miss, n), known, asked)
        hits = first_miss
        while hits < n and (known.get(hits) or present.get(hits)):
            hits += 1
        return hits

    def lease_prefix(
        self, keys: Sequence[bytes], lease_ms: int, lease_id: int | None = None
    ) -> tuple[int, int]:
        """prefix_hits that also pins the keys found on their owners for ``lease_ms`` (no
        eviction until then or until ``release``). Returns (count, lease id): one id, chosen
        here, names the lease on every node, so any process may release it; 0 when no node
        pinned anything. ``lease_id`` joins or names a lease (default: a new random id)."""
        lease_id = lease_id or secrets.randbits(63) | 1
        self._send_deferred_releases()
        pinned: list[bool] = []
        count = self._prefix(keys, (int(lease_ms), lease_id), pinned)
        return count, lease_id if pinned else 0

    def release(self, lease_id: int, keys: Sequence[bytes] | None = None) -> int:
        """Unpin ``keys`` of a lease (the whole lease, on every live member, when None); returns
        how many were unpinned. A part no member could take now (a slow call may have marked its
        node down) is sent again with a later release or lookup of this client; a node that
        stays away lets it expire."""
        keys = None if keys is None else [check_key(k) for k in keys]
        self._send_deferred_releases()
        return self._release(lease_id, keys, defer=True)

    def _release(self, lease_id: int, keys: list[bytes] | None, defer: bool) -> int:
        try:
            routing = self._routing(require_writable=False)
        except Unavailable:
            if not defer:
                raise
            self._defer_release(lease_id, keys)
            return 0
        if keys is None:
            groups: dict[str, list] = {n: [] for n in routing.readable}
        else:
            groups = defaultdict(list)
            for key, nodes in zip(keys, routing.candidates(keys), strict=True):
                for node in nodes:
                    groups[node].append(key)
        counts, failed = self._fan_out(
            routing, groups, lambda m, ks: m.conn.release(lease_id, None if keys is None else ks)
        )
        for node in failed:
            if not defer:
                raise failed[node]
            self._defer_release(lease_id, None if keys is None else groups[node])
        return sum(counts.values())

    def _defer_release(self, lease_id: int, keys: list[bytes] | None, at: float | None = None) -> None:
        with self._deferred_lock:
            self._deferred_releases.append((time.monotonic() if at is None else at, lease_id, keys))
            del self._deferred_releases[:-MAX_DEFERRED_RELEASES]

    def _send_deferred_releases(self) -> None:
        with self._deferred_lock:
            if not self._deferred_releases:
                return
            due, self._deferred_releases = self._deferred_releases, []
        for at, lease_id, keys in due:
            if time.monotonic() - at > MAX_TTL_S:
                continue  # expired by now on any node
            try:
                self._release(lease_id, keys, defer=False)
            except Unavailable:
                self._defer_release(lease_id, keys, at)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        keys = [check_key(k) for k in keys]
        if not keys:
            return []
        routing = self._routing(require_writable=False)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, owners in enumerate(routing.owners(keys)):
            if owners:
                groups[owners[0]].append(i)
        flags, failed = self._fan_out(routing, groups, lambda m, idx: m.conn.contains([keys[i] for i in idx]))
        known: dict[int, bool] = {}
        asked: dict[int, str] = {}
        for node, idx in groups.items():
            for i, flag in zip(idx, flags.get(node, ()), strict=False):
                known[i] = flag
                asked[i] = node
        if failed:
            routing = self._routing(require_writable=False)
        rest = [i for i in range(len(keys)) if not known.get(i)]
        present = self._present_elsewhere(routing, keys, rest, known, asked) if rest else {}
        return [bool(known.get(i) or present.get(i)) for i in range(len(keys))]

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from every node that may hold them; returns how many were held."""
        keys = list(dict.fromkeys(check_key(k) for k in keys))
        if not keys:
            return 0
        routing = self._routing(require_writable=False)
        holders: dict[str, list[int]] = defaultdict(list)
        for i, candidates in enumerate(routing.candidates(keys)):
            for node in candidates:
                holders[node].append(i)
        single = sum(len(idx) for idx in holders.values()) == len(keys)
        held: set[int] = set()
        if not single:  # several copies: count the keys held, not the copies removed
            flags, _ = self._fan_out(routing, holders, lambda m, idx: m.conn.contains([keys[i] for i in idx]))
            for node, idx in holders.items():
                held.update(i for i, f in zip(idx, flags.get(node, ()), strict=False) if f)
        counts, failed = self._fan_out(routing, holders, lambda m, idx: m.conn.delete([keys[i] for i in idx]))
        if failed:
            raise Unavailable(
                "delete did not reach " + "; ".join(f"{node}: {exc}" for node, exc in failed.items())
            )
        return sum(counts.values()) if single else len(held)

    def stats(self) -> dict:
        """Every member's stats under "nodes", and the pool's totals per tier at the top level."""
        self._ensure_members()
        members = dict(self._members)
        pending = {}
        for node, member in members.items():
            if member.up and member.info.state != ms.DOWN:
                with contextlib.suppress(KVPoolError):
                    pending[node] = member.conn.stats_async()
        nodes: dict[str, dict] = {}
        for node, member in sorted(members.items()):
            entry = member.summary()
            if node in pending:
                try:
                    entry.update(pending[node].result())
                    member.breaker.record_success()
                except Unavailable as exc:
                    self._failed(member, exc)
                    entry.update(state="unreachable", error=str(exc))
            nodes[node] = entry
        return _pool_totals(nodes, self.replication_factor)

    def members(self) -> list[dict]:
        """The members as this client sees them: id, URL, state, incarnation, ports, breaker."""
        self._ensure_members()
        return [m.summary() for _, m in sorted(self._members.items())]

    def hello(self) -> pb.HelloResponse:
        """The Hello of the node the URL names first (or of the first member that answers)."""
        members = self._ensure_members()
        first = next((m for m in members.values() if m.info.address == self._seeds[0]), None)
        order = ([first] if first else []) + [m for m in members.values() if m is not first]
        error: KVPoolError = Unavailable(f"no member of {self.url} answered")
        for member in order:
            try:
                return member.conn.hello()
            except Unavailable as exc:
                error = exc
        raise error

    # -- routing helpers -----------------------------------------------------------------
    def _routing(self, require_writable: bool = True) -> _Routing:
        members = self._ensure_members()
        placed = tuple(sorted(n for n, m in members.items() if m.info.state in ms.PLACED_STATES and m.up))
        readable = frozenset(n for n, m in members.items() if m.info.state in ms.READABLE_STATES and m.up)
        if not readable or (require_writable and not placed):
            self._wake_refresher()
            states = ", ".join(f"{n} {m.summary()['state']}" for n, m in sorted(members.items()))
            raise Unavailable(f"no member of {self.url} is reachable ({states})")
        current = self._views.observe(placed)
        return _Routing(members, current, readable, self._views.previous(), self.replication_factor)

    def _fan_out(self, routing: _Routing, groups: Mapping[str, list], call) -> tuple[dict, dict]:
        """Run `call(member, items)` for each node's group in parallel (the caller's thread takes
        one group). Returns (results by node, Unavailable by node); other errors propagate."""
        results: dict = {}
        failed: dict = {}

        def run(node: str):
            member = routing.members[node]
            try:
                value = call(member, groups[node])
            except NixlRequired:
                raise  # transport="nixl" refused a fallback: the node itself is fine
            except Unavailable as exc:
                self._failed(member, exc)
                return node, False, exc
            member.breaker.record_success()
            return node, True, value

        nodes = list(groups)
        futures = [self._pool().submit(run, node) for node in nodes[1:]]
        outcomes = [run(nodes[0])] if nodes else []
        outcomes.extend(f.result() for f in futures)
        for node, ok, value in outcomes:
            (results if ok else failed)[node] = value
        return results, failed

    def _present_elsewhere(
        self,
        routing: _Routing,
        keys: list[bytes],
        indices: Iterable[int],
        known: Mapping[int, bool],
        asked: Mapping[int, str],
    ) -> dict[int, bool]:
        """Ask every other place each key may be (one Contains per node, in parallel)."""
        groups: dict[str, list[int]] = defaultdict(list)
        wanted = [i for i in indices if not known.get(i)]
        for i, candidates in zip(wanted, routing.candidates([keys[i] for i in wanted]), strict=True):
            for node in candidates:
                if node != asked.get(i) or i not in known:
                    groups[node].append(i)
        flags, _ = self._fan_out(routing, groups, lambda m, idx: m.conn.contains([keys[i] for i in idx]))
        present: dict[int, bool] = {}
        for node, idx in groups.items():
            for i, flag in zip(idx, flags.get(node, ()), strict=False):
                present[i] = present.get(i, False) or flag
        return present

    def _copy_to_new_owners(
        self, routing: _Routing, values: Mapping[bytes, bytes], missed: Mapping[bytes, list[str]]
    ) -> None:
        """Handoff on read: values found away from an owner that missed are copied to it, in
        the background (a failed copy only means the next read asks the earlier owner again)."""
        groups: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        for (key, value), owners in zip(values.items(), routing.owners(list(values)), strict=True):
            for node in owners:
                if node in missed.get(key, ()):
                    groups[node].append((key, value))
        for node, items in groups.items():
            member = routing.members[node]
            self.handoff_copies += len(items)
            self._pool().submit(self._copy, member, items)

    @staticmethod
    def _copy(member: _Member, items: list[tuple[bytes, bytes]]) -> None:
        try:
            member.conn.put_many(items)
        except KVPoolError as exc:
            log.debug("handoff copy of %d values to %s failed: %s", len(items), member.info.node_id, exc)

    def _failed(self, member: _Member, exc: Exception) -> None:
        if isinstance(exc, NodeLeaving):  # still serves reads: place new keys elsewhere, keep reading
            member.info = member.info.with_state(ms.LEAVING)
        else:
            member.breaker.record_failure()
            log.debug("pool member %s failed: %s", member.info.node_id, exc)
        self._wake_refresher()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(PARALLEL_CALLS, thread_name_prefix="kvpool-client")
        return self._executor

    # -- membership ----------------------------------------------------------------------
    def _ensure_members(self) -> dict[str, _Member]:
        members = self._members
        if members:
            return members
        if self._closed:
            raise Unavailable("client is closed")
        with self._bootstrap_lock:
            if not self._members:
                self._refresh(raise_errors=True)
        if self._refresher is None:
            with self._lock:
                if self._refresher is None and not self._closed:
                    self._refresher = threading.Thread(
                        target=self._refresh_loop, name="kvpool-client-members", daemon=True
                    )
                    self._refresher.start()
        return self._members

    def _conn(self, address: tuple[str, int]) -> NodeConnection:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = NodeConnection(
                address[0], address[1], self._options, lambda: self.buffers
            )
        return conn

    def _refresh(self, *, raise_errors: bool = False) -> bool:
        """Ask the seeds (else the known members) who the members are; merge their answers."""
        self._last_refresh = time.monotonic()
        with self._lock:
            targets = [self._conn(a) for a in self._seeds]
        reports, errors = self._ask(targets)
        if not reports:
            with self._lock:
                known = [m.conn for m in self._members.values() if m.up and m.conn not in targets]
            more, more_errors = self._ask(known[:3])
            reports, errors = more, errors + more_errors
        if not reports:
            if raise_errors:
                for kind in (Unauthenticated, InvalidRequest):
                    error = next((e for e in errors if isinstance(e, kind)), None)
                    if error is not None:
                        raise error
                raise Unavailable(f"no node of {self.url} answered: " + "; ".join(map(str, errors)))
            return False
        self._apply(reports)
        return True

    def _ask(self, conns: list[NodeConnection]) -> tuple[list[ms.Report], list[KVPoolError]]:
        """Members from each connection at once; returns once all answered, or the first
        answered and SEED_GRACE_S passed (a dead seed costs the others nothing)."""
        reports: list[ms.Report] = []
        errors: list[KVPoolError] = []
        done = threading.Condition()
        pending = []
        for conn in conns:
            try:
                call = conn.members_async(timeout=min(self._options.timeout, PROBE_TIMEOUT_S * 2))
            except KVPoolError as exc:
                errors.append(exc)
                continue
            pending.append((conn, call))

            def notify() -> None:
                with done:
                    done.notify_all()

            call.add_done_callback(notify)
        deadline = time.monotonic() + self._options.timeout
        first_answer: float | None = None
        while True:
            with done:
                finished = [p for p in pending if p[1].done()]
                if len(finished) == len(pending):
                    break
                if first_answer is None and any(_succeeded(c) for _, c in finished):
                    first_answer = time.monotonic()
                limit = deadline if first_answer is None else min(deadline, first_answer + SEED_GRACE_S)
                left = limit - time.monotonic()
                if left <= 0:
                    break
                done.wait(left)
        for conn, call in pending:
            if not call.done():
                continue
            try:
                reports.append(ms.Report.from_pb(call.result(), conn.host))
            except Unimplemented:
                try:  # a node without Members (an older node, an agent): a member on its own
                    hello = conn.hello()
                    info = ms.MemberInfo(hello.node_id or conn.url, conn.host, conn.port, hello.data_port)
                    reports.append(ms.Report(info))
                except KVPoolError as exc:
                    errors.append(exc)
            except KVPoolError as exc:
                errors.append(exc)
        return reports, errors

    def _apply(self, reports: list[ms.Report]) -> None:
        merged = ms.merge(reports)
        answered = {r.node.node_id for r in reports}
        replicas = next((r.replication_factor for r in reports if r.replication_factor), 0)
        if replicas:
            self._pool_replicas = replicas
        for report in reports:
            if report.previous:
                self._views.remember(report.previous, report.changed_s_ago)
        now = time.monotonic()
        with self._lock:
            members: dict[str, _Member] = {}
            for node, info in merged.items():
                members[node] = self._member(self._members.get(node), info, now)
                if node in answered:
                    members[node].breaker.record_success()
            used = {m.conn.address for m in members.values()} | set(self._seeds)
            for address in [a for a in self._conns if a not in used]:
                self._retire(address, now)
            self._members = members
            # calls still using a retired connection get time to finish before it closes
            old_enough = [c for c, t in self._retired if now - t > 2 * self._options.timeout]
            self._retired = [(c, t) for c, t in self._retired if now - t <= 2 * self._options.timeout]
        for conn in old_enough:
            conn.close()

    def _member(self, old: _Member | None, info: ms.MemberInfo, now: float) -> _Member:
        """The member as `info` describes it (under self._lock)."""
        breaker = old.breaker if old is not None else self._breaker(info.node_id)
        if old is not None and old.info.incarnation and old.info.incarnation != info.incarnation:
            # it restarted: a new channel (the old one may sit in gRPC's reconnect back-off),
            # a new data port and session token, and a fresh chance
            self._retire(info.address, now)
            breaker = self._breaker(info.node_id)
        return _Member(info, self._conn(info.address), breaker)

    def _retire(self, address: tuple[str, int], now: float) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            self._retired.append((conn, now))

    def _breaker(self, node: str) -> CircuitBreaker:
        def on_change(state: State) -> None:
            if state is State.OPEN:
                log.warning("pool member %s is down; its keys go to the next node in rendezvous order", node)
            elif state is State.CLOSED:
                log.info("pool member %s is back", node)

        return CircuitBreaker(
            failure_threshold=1,
            reset_timeout=BREAKER_RESET_S,
            max_reset_timeout=BREAKER_MAX_RESET_S,
            on_change=on_change,
        )

    def _wake_refresher(self) -> None:
        self._wake.set()

    def _refresh_loop(self) -> None:
        """Refresh the members every refresh_interval (sooner after errors) and probe members
        whose breaker is open once their wait is over (the half-open probe)."""
        while not self._closed:
            now = time.monotonic()
            due = self._last_refresh + self._refresh_interval - now
            waits = [m.breaker.retry_in() for m in self._members.values() if not m.up]
            self._wake.wait(max(0.05, min([due, *waits])))
            if self._closed:
                return
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                self._probe_down_members()
                since = time.monotonic() - self._last_refresh
                if since >= self._refresh_interval or (woken and since >= MIN_REFRESH_GAP_S):
                    self._refresh()
            except Exception:  # never let the thread die: routing depends on it
                log.exception("refreshing the members of %s failed", self.url)

    def _probe_down_members(self) -> None:
        for member in list(self._members.values()):
            if member.up or not member.breaker.allow():
                continue
            try:
                reply = member.conn.members(timeout=min(self._options.timeout, PROBE_TIMEOUT_S))
            except KVPoolError:
                member.breaker.record_failure()
                continue
            # it answers: believe what it says about itself (it may have restarted, and may still
            # be rebuilding its disk index) before any request goes to it
            info = ms.MemberInfo.from_pb(reply.node, member.conn.host)
            node = member.info.node_id
            if info.node_id == node:
                with self._lock:
                    current = self._members.get(node)
                    if current is not None:
                        fresh = self._member(current, info, time.monotonic())
                        self._members = {**self._members, node: fresh}
                        fresh.breaker.record_success()
            self._wake.set()  # and learn the rest at the next refresh


def _succeeded(call) -> bool:
    try:
        call.result()
    except KVPoolError:
        return False
    return True


def _replication_factor(value: int | None) -> int:
    """0 means "what the pool says"."""
    if value is None:
        text = os.environ.get("KVPOOL_REPLICATION_FACTOR", "").strip()
        if not text:
            return 0
        try:
            value = int(text)
        except ValueError:
            raise InvalidRequest(f"KVPOOL_REPLICATION_FACTOR must be an integer, got {text!r}") from None
    if value < 1:
        raise InvalidRequest(f"replication factor must be at least 1, got {value}")
    return value


_SUMMED = ("capacity", "used", "entries", "hits", "misses", "evictions", "arena_used", "corrupt")
_SUMMED_TOP = (
    "pending_writes",
    "pending_write_bytes",
    "dropped_writes",
    "demotions",
    "pinned_bytes",
    "leases",
    "leases_expired",
)


def _pool_totals(nodes: dict[str, dict], replicas: int) -> dict:
    """The pool as one cache: per-tier sums over the members that answered."""
    answered = [n for n in nodes.values() if "tiers" in n]
    tiers: dict[str, dict] = {}
    for node in answered:
        for name, tier in node["tiers"].items():
            total = tiers.setdefault(name, {})
            for field in _SUMMED:
                value = tier.get(field)
                if isinstance(value, int | float):
                    total[field] = total.get(field, 0) + value
            total["degraded"] = bool(total.get("degraded")) or bool(tier.get("degraded"))
    versions = {n.get("version") for n in answered}
    out: dict = {
        "ready": bool(answered) and all(n.get("ready") for n in answered),
        "members": len(nodes),
        "members_up": len(answered),
        "replication_factor": replicas,
        "version": versions.pop() if len(versions) == 1 else sorted(map(str, versions)),
        "tiers": tiers,
        "nodes": nodes,
    }
    for field in _SUMMED_TOP:
        out[field] = sum(n.get(field, 0) or 0 for n in answered)
    return out
