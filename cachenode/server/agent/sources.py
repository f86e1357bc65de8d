"""Where an agent finds what its arena misses: peer agents, then the cache nodes.

One Locate call to the lookup service names, for the longest prefix of the keys that anyone holds,
who holds which key. Peers are tried in a fixed order — agents before nodes, then the holder with
the longest run of the keys (fewest connections), then by id — each key at its first usable
holder, then, for keys that holder no longer had or that failed, at its next one. What no peer
delivered is read from the pool of cache nodes (`pool.PoolLink`), if the agent has one; without
one, cache nodes that publish to the lookup service are peers like any other.

The agent's own entries are skipped (the index may still list a key it just evicted). A lookup
service that fails is skipped for a while (a breaker): the agent then serves from its arena and
the pool alone. Values arrive in pooled receive buffers (NIXL READ or the data channel's
recv_into); the caller copies them into its arena and releases them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kvpool.cachenode.client.buffers import PooledBuffer
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.errors import KVPoolError, PeerSkipped
from kvpool.cachenode.core.located import HolderMatch
from kvpool.cachenode.server.agent.peers import PeerLinks
from kvpool.cachenode.server.agent.pool import PoolLink

log = logging.getLogger(__name__)

PEER_ROUNDS = 2  # a key's first holder, then its next one
MAX_POOL_CALLS = 4  # alternations of peer runs and pool runs in one count
LOG_EVERY_S = 30.0

PEER, POOL = "peer", "pool"


class Sources:
    """Thread-safe."""

    def __init__(
        self,
        self_id: str,
        *,
        lookup: LookupClient | None,
        peers: PeerLinks,
        pool: PoolLink | None,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.self_id = self_id
        self.lookup = lookup
        self.peers = peers
        self.pool = pool
        self._executor = executor

        def on_change(state: State) -> None:
            if state is State.OPEN and lookup is not None:
                log.warning("lookup service %s failed; asking only the pool for a while", lookup.url)
            elif state is State.CLOSED and lookup is not None:
                log.info("lookup service %s answers again", lookup.url)

        self.lookup_breaker = CircuitBreaker(
            failure_threshold=2, reset_timeout=1.0, max_reset_timeout=10.0, on_change=on_change
        )
        self._last_log = 0.0
        self.fetched = {PEER: 0, POOL: 0}
        self.fetched_bytes = {PEER: 0, POOL: 0}

    # -- which peer holds what -----------------------------------------------------------------

    def peer_plan(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Per key, the addresses of the peers that hold it, in the order to ask them."""
        empty: list[list[str]] = [[] for _ in keys]
        if self.lookup is None or not keys or not self.lookup_breaker.allow():
            return empty
        try:
            located = self.lookup.locate(keys)
        except KVPoolError as exc:
            self.lookup_breaker.record_failure()
            metrics.AGENT_FETCH_ERRORS.labels("lookup").inc()
            self._warn(f"lookup service {self.lookup.url}: {exc}")
            return empty
        self.lookup_breaker.record_success()
        matches = [m for m in located.holders if self._wanted(m)]
        matches.sort(key=lambda m: (m.info.kind != "agent", -m.run, m.info.holder_id))
        matches = [m for m in matches if self.peers.usable(m.info.address)]
        plan = empty
        for j in range(min(located.prefix, len(keys))):
            byte, bit = divmod(j, 8)
            plan[j] = [m.info.address for m in matches if m.bitmap[byte] >> bit & 1]
        return plan

    def _wanted(self, match: HolderMatch) -> bool:
        info = match.info
        if info.holder_id == self.self_id or not info.address:
            return False
        return info.kind == "agent" or self.pool is None  # nodes: through the pool's placement

    # -- the connector's lookup ----------------------------------------------------------------

    def count(self, keys: Sequence[bytes], lease_ms: int = 0, lease_id: int = 0) -> tuple[int, bool]:
        """How many leading `keys` peers or the pool can deliver; with `lease_ms`, the pool pins
        what it holds under `lease_id`. Returns (count, whether the pool pinned anything)."""
        plan = self.peer_plan(keys)
        pos, pinned, calls = 0, False, 0
        while pos < len(keys):
            if plan[pos]:
                pos += 1
                continue
            if self.pool is None or calls >= MAX_POOL_CALLS:
                break
            calls += 1
            found, did_pin = self.pool.prefix(keys[pos:], lease_ms, lease_id)
            pinned = pinned or did_pin
            if not found:
                break
            pos += found
        return pos, pinned

    # -- fetching ------------------------------------------------------------------------------

    def fetch(self, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer]:
        """What peers, else the pool, deliver of `keys`, in pooled buffers the caller releases."""
        found: dict[bytes, PooledBuffer] = {}
        try:
            self._from_peers(keys, found)
            rest = [k for k in keys if k not in found]
            if rest and self.pool is not None:
                got = self.pool.get_many_into(rest)
                self._count(POOL, got)
                found.update(got)
        except BaseException:
            for buf in found.values():
                buf.release()
            raise
        return found

    def _from_peers(self, keys: Sequence[bytes], found: dict[bytes, PooledBuffer]) -> None:
        todo = {j: cands for j, cands in enumerate(self.peer_plan(keys)) if cands}
        for _ in range(PEER_ROUNDS):
            groups: dict[str, list[bytes]] = defaultdict(list)
            for j, cands in todo.items():
                if cands:
                    groups[cands.pop(0)].append(keys[j])
            if not groups:
                return
            for got in self._ask_peers(groups):
                self._count(PEER, got)
                found.update(got)
            todo = {j: cands for j, cands in todo.items() if keys[j] not in found}

    def _ask_peers(self, groups: dict[str, list[bytes]]) -> list[dict[bytes, PooledBuffer]]:
        """Each peer's part, in parallel; a peer that fails delivers nothing."""

        def ask(address: str) -> dict[bytes, PooledBuffer]:
            try:
                return self.peers.get_many_into(address, groups[address])
            except PeerSkipped:
                return {}
            except KVPoolError as exc:
                metrics.AGENT_FETCH_ERRORS.labels("peer").inc()
                self._warn(f"peer {address}: {exc}")
                return {}

        addresses = list(groups)
        futures = [self._executor.submit(ask, a) for a in addresses[1:]]
        results = [ask(addresses[0])]
        results.extend(f.result() for f in futures)
        return results

    def _count(self, source: str, got: dict[bytes, PooledBuffer]) -> None:
        if not got:
            return
        size = sum(b.nbytes for b in got.values())
        self.fetched[source] += len(got)
        self.fetched_bytes[source] += size
        metrics.AGENT_FETCHED.labels(source).inc(len(got))
        metrics.AGENT_FETCHED_BYTES.labels(source).inc(size)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("%s; treated as a miss", message)
        else:
            log.debug("%s; treated as a miss", message)

    def stats(self) -> dict:
        return {
            "lookup": self.lookup.url if self.lookup is not None else None,
            "lookup_breaker": self.lookup_breaker.state.value,
            "fetched": dict(self.fetched),
            "fetched_bytes": dict(self.fetched_bytes),
        }
