"""The interface between the node's tiered store and the shared tiers behind it (Redis/Valkey, S3).

The store (cachenode/store.py) owns L1 memory and L2 disk; shared tiers plug in behind them.
A shared tier never raises into the store and never blocks a request beyond its short timeout:
a failure or a slow answer is a miss, counted in metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class SharedTier(Protocol):
    name: str

    def get_many(self, keys: Sequence[bytes]) -> list[memoryview | bytes | None]:
        """Verified values (record checksum checked) or None per key; never raises."""
        ...

    def submit_put(self, key: bytes, value: memoryview | bytes) -> None:
        """Queue a background write; returns at once (bounded queue, oldest dropped)."""
        ...

    def delete(self, keys: Sequence[bytes]) -> None:
        """Best-effort removal."""
        ...

    def flush(self, timeout: float) -> bool:
        """Wait until queued writes are done; False on timeout."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class PolicyTier(SharedTier, Protocol):
    """A shared tier that carries the pool's policy (the Redis and S3 tiers do).

    Optional on top of SharedTier, so simple tiers (test doubles) need not implement it; the
    store checks with isinstance(tier, PolicyTier) or getattr.
    """

    promote_on_read: bool
    """Copy a hit from this tier into L1/L2 (False: serve it, keep local tiers for hot data)."""

    def demote(self, key: bytes, value: memoryview | bytes) -> None:
        """The store evicted `key` from its last local tier (L2, or L1 without disk). Under the
        write-back policy the tier queues it (demotion before drop); under write-through it was
        already written and this does nothing. Returns at once; copies a mutable buffer."""
        ...

    def stats(self) -> dict:
        """Breaker state, queue depth, written and dropped counts, for the node's stats()."""
        ...
