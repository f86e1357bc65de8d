"""`Client`: the Python API of a kvpool pool — one node, `kvpool up`, or many nodes as one cache.

Like Memcached and Redis Cluster clients, it routes each key itself, in one hop: it learns the
members from any node it is given (a comma-separated list of node URLs, or one URL of a node or
of the pool's Service), places each key by rendezvous hashing over the members' stable ids
(routing.py) and talks to the owners directly, one request per node, in parallel (fanout.py).
Per node it uses a `NodeConnection` (connection.py); who the members are, and whether they
answer, is membership.py's job.

Handoff: the client remembers the views (sets of members) of the last few minutes, and nodes
report the view before their last change. A read whose owner misses asks the owners under those
earlier views — and, while some member is not in every node's view (nodes without `--peers`),
the next nodes in rendezvous order — before it reports a miss (reads.py), and copies what it finds
to the new owner, so adding a node turns no stored key into a miss.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client import reads
from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer
from kvpool.cachenode.client.connection import (
    DATA_CONNECTIONS,
    DEFAULT_RECEIVE_BUFFER_BYTES,
    DEFAULT_TIMEOUT_S,
    ConnectOptions,
)
from kvpool.cachenode.client.datachannel import Value
from kvpool.cachenode.client.fanout import FanOut
from kvpool.cachenode.client.membership import Membership, wanted_replicas
from kvpool.cachenode.client.pool_stats import pool_totals
from kvpool.cachenode.client.releases import DeferredReleases
from kvpool.cachenode.client.routing import Member
from kvpool.cachenode.core.errors import InvalidRequest, KVPoolError, Unavailable
from kvpool.cachenode.core.settings import SETTINGS
from kvpool.cachenode.core.urls import parse_url, parse_urls
from kvpool.cachenode.core.validation import check_key
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb

DEFAULT_REFRESH_S = 5.0
DEFAULT_HANDOFF_WINDOW_S = 300.0

__all__ = ["Client", "parse_url", "parse_urls"]


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
        miss_fallback_nodes: int | None = None,
    ) -> None:
        """`transport`: "auto" moves bulk bytes to each node over NIXL where that is the fast path
        (same host, RDMA), set up in the background as the client connects and falling back to
        the TCP data channel per request on any NIXL failure; "nixl" requires NIXL; "grpc" never
        uses it. `receive_buffer_bytes` sizes the pool of receive buffers (`buffers`) that
        `get_many_into` and NIXL READs fill, shared by every node. `miss_fallback_nodes`: how
        many next nodes in rendezvous order a read also asks while the members' views disagree
        (default: env KVPOOL_MISS_FALLBACK_NODES, else 2; 0: never)."""
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
        self._deferred = DeferredReleases()
        self._membership = Membership(
            url,
            self._seeds,
            self._options,
            lambda: self.buffers,
            replicas_wanted=wanted_replicas(replication_factor),
            refresh_interval=refresh_interval,
            handoff_window=handoff_window,
            fallback_nodes=_fallback_nodes(miss_fallback_nodes),
        )
        self._fanout = FanOut(self._membership.failed)
        if transport == "nixl":  # set up now: a pool that cannot do it is an error here, not later
            self._ensure_members()

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._membership.stop()
        self._fanout.close()
        self._membership.close_connections()
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
        return self._membership.replication_factor

    @property
    def handoff_copies(self) -> int:
        """Values found at an earlier owner and copied to the new one."""
        return self._fanout.handoff_copies

    @property
    def fallback_hits(self) -> int:
        """Keys found away from their current owners after those missed (a node joined)."""
        return self._fanout.fallback_hits

    def update_url(self, url: str) -> None:
        """Learn the members from `url` from now on (say, the list with a node added); keys
        keep being found at their owners under the list before, for the handoff window."""
        seeds, tls = parse_urls(url)
        if tls != self._options.tls:
            raise InvalidRequest(f"{url} and {self.url} differ in TLS; use a new Client")
        self.url = url
        self._membership.set_seeds(url, seeds)

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
        routing = self._membership.routing()
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
            results, failed = self._fanout.run(
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
            routing = self._membership.routing(require_writable=False)
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
        return reads.get_found(self._membership, self._fanout, keys, into, found)

    def get_into(self, key: bytes, buffer) -> int | None:
        """Receive a value straight into `buffer` (writable, large enough); its size, or None."""
        return reads.get_into(self._membership, self._fanout, check_key(key), buffer)

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
        routing = self._membership.routing(require_writable=False)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, owners in enumerate(routing.owners(keys)):
            if owners:
                groups[owners[0]].append(i)
        known: dict[int, bool] = {}
        asked: dict[int, str] = {}

        def counted(answer: tuple[int, int]) -> int:
            if answer[1] and pinned is not None:
                pinned.append(True)
            return answer[0]

        def ask(member: Member, idx: list[int]) -> int:
            sub = [keys[i] for i in idx]
            if lease is None:
                return member.conn.prefix_hits(sub)
            return counted(member.conn.lease_prefix(sub, lease[0], lease[1]))

        def begin(member: Member, idx: list[int]):
            sub = [keys[i] for i in idx]
            if lease is None:
                return member.conn.begin("prefix_hits", sub)
            finish = member.conn.begin("lease_prefix", sub, lease[0], lease[1])
            return None if finish is None else lambda: counted(finish())

        counts, failed = self._fanout.run(routing, groups, ask, begin)
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
            routing = self._membership.routing(require_writable=False)
        # A second round only where a key may also be elsewhere: replicas, earlier owners, or
        # the new owner of a node that just failed. Nothing to ask about the first miss: done.
        if not [c for c in routing.candidates([keys[first_miss]])[0] if c != asked.get(first_miss)]:
            return first_miss
        present = self._fanout.present_elsewhere(routing, keys, range(first_miss, n), known, asked)
        hits = first_miss
        while hits < n and (known.get(hits) or present.get(hits)):
            hits += 1
        elsewhere = {keys[i]: present[i] for i in range(first_miss, hits) if i in present}
        self._fanout.count_fallbacks(routing, elsewhere, "lookup")
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
            routing = self._membership.routing(require_writable=False)
        except Unavailable:
            if not defer:
                raise
            self._deferred.defer(lease_id, keys)
            return 0
        if keys is None:
            groups: dict[str, list] = {n: [] for n in routing.readable}
        else:
            groups = defaultdict(list)
            for key, nodes in zip(keys, routing.candidates(keys), strict=True):
                for node in nodes:
                    groups[node].append(key)
        counts, failed = self._fanout.run(
            routing,
            groups,
            lambda m, ks: m.conn.release(lease_id, None if keys is None else ks),
            lambda m, ks: m.conn.begin("release", ks, lease_id),  # no keys: the whole lease
        )
        for node in failed:
            if not defer:
                raise failed[node]
            self._deferred.defer(lease_id, None if keys is None else groups[node])
        return sum(counts.values())

    def _send_deferred_releases(self) -> None:
        for at, lease_id, keys in self._deferred.take_due():
            try:
                self._release(lease_id, keys, defer=False)
            except Unavailable:
                self._deferred.defer(lease_id, keys, at)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        keys = [check_key(k) for k in keys]
        if not keys:
            return []
        routing = self._membership.routing(require_writable=False)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, owners in enumerate(routing.owners(keys)):
            if owners:
                groups[owners[0]].append(i)
        flags, failed = self._fanout.run(
            routing,
            groups,
            lambda m, idx: m.conn.contains([keys[i] for i in idx]),
            lambda m, idx: m.conn.begin("contains", [keys[i] for i in idx]),
        )
        known: dict[int, bool] = {}
        asked: dict[int, str] = {}
        for node, idx in groups.items():
            for i, flag in zip(idx, flags.get(node, ()), strict=False):
                known[i] = flag
                asked[i] = node
        if failed:
            routing = self._membership.routing(require_writable=False)
        rest = [i for i in range(len(keys)) if not known.get(i)]
        present = self._fanout.present_elsewhere(routing, keys, rest, known, asked) if rest else {}
        self._fanout.count_fallbacks(routing, {keys[i]: node for i, node in present.items()}, "lookup")
        return [bool(known.get(i) or present.get(i)) for i in range(len(keys))]

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from every node that may hold them; returns how many were held."""
        keys = list(dict.fromkeys(check_key(k) for k in keys))
        if not keys:
            return 0
        routing = self._membership.routing(require_writable=False)
        holders: dict[str, list[int]] = defaultdict(list)
        for i, candidates in enumerate(routing.candidates(keys)):
            for node in candidates:
                holders[node].append(i)
        single = sum(len(idx) for idx in holders.values()) == len(keys)
        held: set[int] = set()
        if not single:  # several copies: count the keys held, not the copies removed
            flags, _ = self._fanout.run(
                routing, holders, lambda m, idx: m.conn.contains([keys[i] for i in idx])
            )
            for node, idx in holders.items():
                held.update(i for i, f in zip(idx, flags.get(node, ()), strict=False) if f)
        counts, failed = self._fanout.run(
            routing, holders, lambda m, idx: m.conn.delete([keys[i] for i in idx])
        )
        if failed:
            raise Unavailable(
                "delete did not reach " + "; ".join(f"{node}: {exc}" for node, exc in failed.items())
            )
        return sum(counts.values()) if single else len(held)

    def stats(self) -> dict:
        """Every member's stats under "nodes", and the pool's totals per tier at the top level."""
        self._ensure_members()
        members = dict(self._membership.members)
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
                    self._membership.failed(member, exc)
                    entry.update(state="unreachable", error=str(exc))
            nodes[node] = entry
        return pool_totals(nodes, self.replication_factor)

    def members(self) -> list[dict]:
        """The members as this client sees them: id, URL, state, incarnation, ports, breaker."""
        self._ensure_members()
        return [m.summary() for _, m in sorted(self._membership.members.items())]

    def hello(self) -> pb.HelloResponse:
        """The Hello of the node the URL names first (or of the first member that answers)."""
        members = self._ensure_members()
        first = next((m for m in members.values() if m.info.address == self._membership.seeds[0]), None)
        order = ([first] if first else []) + [m for m in members.values() if m is not first]
        error: KVPoolError = Unavailable(f"no member of {self.url} answered")
        for member in order:
            try:
                return member.conn.hello()
            except Unavailable as exc:
                error = exc
        raise error

    def _ensure_members(self) -> dict[str, Member]:
        return self._membership.ensure()


def _fallback_nodes(value: int | None) -> int:
    """The argument, else env KVPOOL_MISS_FALLBACK_NODES, else the registry's default."""
    setting = SETTINGS["miss_fallback_nodes"]
    try:
        return setting.value(value if value is not None else os.environ.get(setting.env, setting.default))
    except ValueError as exc:
        raise InvalidRequest(f"{setting.env}: {exc}") from None
