"""The interface between the node's tiered store and the shared tiers behind it (Redis/Valkey, S3),
and the base those two tiers share.

The store (tiers/store.py) owns L1 memory and L2 disk; shared tiers plug in behind them.
A shared tier never raises into the store and never blocks a request beyond its short timeout:
a failure or a slow answer is a miss, counted in metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.breaker import STATE_VALUE, CircuitBreaker, State
from kvpool.cachenode.core.writebehind import Skipped, WriteBehindQueue

log = logging.getLogger(__name__)


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


def wants_demotions(tier: SharedTier) -> bool:
    """Whether the store must hand evictions to `tier`: a PolicyTier not known to write through.

    A tier whose policy cannot be read gets demotions (its `demote` decides); a write-through
    tier does not, so the store skips reading evicted disk records back for nothing.
    """
    if not isinstance(tier, PolicyTier):
        return False
    return getattr(getattr(tier, "policy", None), "write", None) != "through"


class BackgroundTier:
    """What the Redis and S3 tiers share: the SharedTier contract around three raw operations.

    A subclass implements `_read_many` (verified values or None; raises only when the tier itself
    failed), `_write_many` and `_delete_many`. This class adds the circuit breaker, the bounded
    write-behind queue, the write policy (through / back), and per-tier metrics, and makes sure
    nothing raises into the store.
    """

    name: str = "tier"

    def __init__(self, name: str, policy) -> None:
        self.name = name
        self.policy = policy
        self.promote_on_read: bool = policy.promote
        self._write_back = policy.write == "back"

        def on_change(state: State) -> None:
            metrics.TIER_BREAKER_STATE.labels(name).set(STATE_VALUE[state])
            metrics.TIER_DEGRADED.labels(name).set(0 if state is State.CLOSED else 1)
            log.warning("shared tier %s: circuit breaker %s", name, state.value)

        self.breaker = CircuitBreaker(
            failure_threshold=policy.breaker_failures, reset_timeout=policy.breaker_reset, on_change=on_change
        )
        metrics.TIER_BREAKER_STATE.labels(name).set(0)
        metrics.TIER_DEGRADED.labels(name).set(0)
        self.queue = WriteBehindQueue(
            name,
            self._guarded_write,
            gate=self.breaker.retry_in,
            max_items=policy.queue_items,
            max_bytes=policy.queue_bytes,
        )

    # -- raw operations (subclasses) -----------------------------------------------------------

    def _read_many(self, keys: Sequence[bytes]) -> list[memoryview | bytes | None]:
        raise NotImplementedError

    def _write_many(self, items: Sequence[tuple[bytes, memoryview | bytes]]) -> int:
        """Write records; return the bytes written."""
        raise NotImplementedError

    def _delete_many(self, keys: Sequence[bytes]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # -- SharedTier ----------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> list[memoryview | bytes | None]:
        if not keys:
            return []
        if not self.breaker.allow():
            metrics.TIER_SKIPPED.labels(self.name, "get").inc()
            metrics.TIER_MISSES.labels(self.name).inc(len(keys))
            return [None] * len(keys)
        start = time.perf_counter()
        try:
            values = self._read_many(keys)
        except Exception as exc:
            self._failed("get", exc)
            metrics.TIER_MISSES.labels(self.name).inc(len(keys))
            return [None] * len(keys)
        self.breaker.record_success()
        metrics.TIER_READ_SECONDS.labels(self.name).observe(time.perf_counter() - start)
        hits = sum(v is not None for v in values)
        metrics.TIER_HITS.labels(self.name).inc(hits)
        metrics.TIER_MISSES.labels(self.name).inc(len(keys) - hits)
        return values

    def submit_put(self, key: bytes, value: memoryview | bytes) -> None:
        """Write-through: queue at once. Write-back: nothing now; `demote` writes on eviction."""
        if not self._write_back:
            self.queue.submit(key, value)

    def demote(self, key: bytes, value: memoryview | bytes) -> None:
        """The store evicted `key` from its last local tier: under write-back, keep it here."""
        if self._write_back:
            self.queue.submit(key, value)

    def delete(self, keys: Sequence[bytes]) -> None:
        self.queue.discard(keys)
        if not keys or not self.breaker.allow():
            return
        try:
            self._delete_many(keys)
        except Exception as exc:
            self._failed("delete", exc)
        else:
            self.breaker.record_success()

    def flush(self, timeout: float) -> bool:
        return self.queue.flush(timeout)

    def close(self) -> None:
        self.queue.close(timeout=0.0)
        self._close()

    # -- helpers -------------------------------------------------------------------------------

    def _guarded_write(self, items: Sequence[tuple[bytes, memoryview | bytes]]) -> None:
        if not self.breaker.allow():
            raise Skipped()
        start = time.perf_counter()
        try:
            nbytes = self._write_many(items)
        except Exception as exc:
            self._failed("put", exc)
            raise
        self.breaker.record_success()
        metrics.TIER_WRITE_SECONDS.labels(self.name).observe((time.perf_counter() - start) / len(items))
        metrics.TIER_BYTES_WRITTEN.labels(self.name).inc(nbytes)

    def _failed(self, op: str, exc: BaseException) -> None:
        self.breaker.record_failure()
        kind = "timeout" if "timeout" in type(exc).__name__.lower() or "timed out" in str(exc) else op
        metrics.TIER_ERRORS.labels(self.name, kind).inc()
        log.debug("shared tier %s %s failed: %r", self.name, op, exc)

    def stats(self) -> dict:
        return {
            "tier": self.name,
            "breaker": self.breaker.state.value,
            "queue_depth": self.queue.depth(),
            "written": self.queue.written,
            "dropped": self.queue.dropped,
        }
