"""The node's small lookup calls (prefix hits, leases, contains) and an agent's (locate, unpin),
shared by the gRPC services and the data channel's control ops so that both transports give the
same answers and count the same metrics. Keys are already checked by the caller (gRPC:
check_keys; data channel: the decoder)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.leases import MAX_TTL_S

if TYPE_CHECKING:
    from kvpool.cachenode.server.tiers.store import TieredStore

MAX_LEASE_MS = int(MAX_TTL_S * 1000)


def prefix_hits(
    store: TieredStore, keys: Sequence[bytes], lease_ms: int, lease_id: int, transport: str
) -> tuple[int, int]:
    """How many leading keys the node holds; with ``lease_ms`` > 0 also pin them under
    ``lease_id`` (0: the node picks one). Returns (count, lease id; 0 without a lease)."""
    if lease_ms:
        if lease_ms > MAX_LEASE_MS:
            raise InvalidRequest(f"lease_ms {lease_ms} exceeds the limit of {MAX_LEASE_MS}")
        count, lease_id = store.lease_prefix(keys, lease_ms / 1000, lease_id or None)
    else:
        count, lease_id = store.prefix_hits(keys), 0
    metrics.REQUESTS.labels("prefix_hits", transport).inc()
    metrics.REQUESTED_KEYS.inc(len(keys))
    metrics.HIT_KEYS.inc(count)
    return count, lease_id


def release(store: TieredStore, lease_id: int, keys: Sequence[bytes] | None, transport: str) -> int:
    """Unpin ``keys`` of a lease (the whole lease when None); how many were unpinned."""
    metrics.REQUESTS.labels("release", transport).inc()
    return store.release(lease_id, keys)


def contains(store: TieredStore, keys: Sequence[bytes], transport: str) -> list[bool]:
    metrics.REQUESTS.labels("contains", transport).inc()
    return [store.contains(k) for k in keys]


class Locator(Protocol):
    """An agent's lookups (``agent.server.AgentServer``; named by a protocol: the agent package
    imports this module)."""

    def locate(self, keys: list[bytes], lease_ms: int, lease_id: int) -> tuple[int, int, int]: ...
    def unpin(self, lease_id: int, keys: Sequence[bytes] | None) -> int: ...


def locate(
    agent: Locator, keys: list[bytes], lease_ms: int, lease_id: int, transport: str
) -> tuple[int, int, int]:
    """An agent's Locate: (leading keys it can deliver, lease id or 0, of them in its arena)."""
    if lease_ms > MAX_LEASE_MS:
        raise InvalidRequest(f"lease_ms {lease_ms} exceeds the limit of {MAX_LEASE_MS}")
    count, lease_id, local = agent.locate(keys, lease_ms, lease_id)
    metrics.REQUESTS.labels("prefix_hits", transport).inc()
    metrics.REQUESTED_KEYS.inc(len(keys))
    metrics.HIT_KEYS.inc(count)
    return count, lease_id, local


def unpin(agent: Locator, lease_id: int, keys: Sequence[bytes] | None, transport: str) -> int:
    metrics.REQUESTS.labels("release", transport).inc()
    return agent.unpin(lease_id, keys)
