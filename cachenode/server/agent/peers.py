"""Connections to the peers the lookup service names: other agents (and, for an agent without a
pool, cache nodes), reached by the address each published, one `NodeConnection` per address.

A peer that fails is skipped for a while (a circuit breaker per address, doubling its wait up to
10 s): a dead agent keeps its entries in the index until its lease runs out, and asking it on
every miss until then would cost a timeout per request. At most `max_links` connections stay
open; the least recently used one is closed to make room.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.core.breaker import CircuitBreaker
from kvpool.cachenode.core.errors import KVPoolError, PeerSkipped
from kvpool.cachenode.core.urls import parse_url

log = logging.getLogger(__name__)

MAX_LINKS = 64
BREAKER_RESET_S = 1.0
BREAKER_MAX_RESET_S = 10.0


class PeerLinks:
    """Thread-safe."""

    def __init__(
        self,
        options: Callable[[bool], ConnectOptions],
        buffers: Callable[[], BufferPool],
        max_links: int = MAX_LINKS,
    ) -> None:
        """`options(tls)`: how to reach a peer (token, timeout, CA, transport)."""
        self._options = options
        self._buffers = buffers
        self._max = max_links
        self._lock = threading.Lock()
        self._links: OrderedDict[str, tuple[NodeConnection, CircuitBreaker]] = OrderedDict()

    def usable(self, address: str) -> bool:
        """Whether a call to this peer may go out now (its breaker is closed, or a probe is due)."""
        with self._lock:
            link = self._links.get(address)
        return link is None or link[1].retry_in() <= 0

    def get_many_into(self, address: str, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer]:
        """What the peer at `address` holds of `keys`, in pooled buffers (the caller releases
        them); KVPoolError when it cannot be reached or its breaker is open."""
        conn, breaker = self._link(address)
        if not breaker.allow():
            raise PeerSkipped(f"peer {address} failed recently; skipped for now")
        try:
            found = conn.get_many_into(keys)
        except KVPoolError:
            breaker.record_failure()
            raise
        breaker.record_success()
        return found

    def close(self) -> None:
        with self._lock:
            links = list(self._links.values())
            self._links.clear()
        for conn, _ in links:
            conn.close()

    def _link(self, address: str) -> tuple[NodeConnection, CircuitBreaker]:
        with self._lock:
            link = self._links.get(address)
            if link is not None:
                self._links.move_to_end(address)
                return link
        host, port, tls = parse_url(address)  # InvalidRequest for an address that is no URL
        conn = NodeConnection(host, port, self._options(tls), self._buffers)
        breaker = CircuitBreaker(
            failure_threshold=1, reset_timeout=BREAKER_RESET_S, max_reset_timeout=BREAKER_MAX_RESET_S
        )
        closed: list[NodeConnection] = []
        with self._lock:
            existing = self._links.get(address)
            if existing is not None:  # another thread made it meanwhile
                closed.append(conn)
                link = existing
            else:
                link = self._links[address] = (conn, breaker)
                while len(self._links) > self._max:
                    _, (old, _) = self._links.popitem(last=False)
                    closed.append(old)
        for old in closed:
            old.close()
        return link
