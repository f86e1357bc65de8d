"""The interface between the node's tiered store and the shared tiers behind it (Redis/Valkey, S3),
and the base those two tiers share.

The store (tiers/store.py) owns L1 memory and L2 disk; shared tiers plug in behind them.
A shared tier never raises into the store and never blocks a request beyond its short timeout:
a failure or a slow answer is a miss, counted in metrics.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
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


def forget_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames that `exc`, its cause and its context hold
    (frames still running are left alone), so that what they refer to is freed now rather than
    at the next cyclic garbage collection (see BackgroundTier.get_many for why that matters)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        todo += [err.__cause__, err.__context__]


class BackgroundTier:
    """What the Redis and S3 tiers share: the SharedTier contract around three raw operations.

    A subclass implements `_read_many` (verified values or None; raises only when the tier itself
    failed), `_write_many` and `_delete_many`. This class adds the circuit breaker, the bounded
    write-behind queue, the write policy (through / back), and per-tier metrics, and makes sure
    nothing raises into the store.
    """

    name: str = "tier"
    READERS = 8
    """Threads that run reads (`_read_many`); more callers at once wait their turn."""

    def __init__(self, name: str, policy) -> None:
        self.name = name
        self._readers = ThreadPoolExecutor(self.READERS, thread_name_prefix=f"kvpool-{name}-read")
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
        """The read runs on one of this tier's reader threads, and its error comes back as a
        value, never raised here. Why: the caller's frames hold what the request has found so
        far, views of L1 ranges (TieredStore.get_many, the data server's reply). A client
        library that keeps a failure's exception in a reference cycle (valkey-py's connect
        keeps it in a local of a frame on its own traceback; botocore's retries keep each
        attempt's) keeps every frame on that traceback, and each of those keeps its callers'
        frames. Raised on the request's thread, that chain reached those views: until the next
        cyclic garbage collection L1 counted them as in use, and a put right after a failed
        read evicted every entry, still found no room and kept its values nowhere local
        (tests/tiers/test_failed_read_keeps_no_memory.py). On a reader thread the chain ends
        in the pool's own loop."""
        if not keys:
            return []
        if not self.breaker.allow():
            metrics.TIER_SKIPPED.labels(self.name, "get").inc()
            metrics.TIER_MISSES.labels(self.name).inc(len(keys))
            return [None] * len(keys)
        start = time.perf_counter()
        try:
            read = self._readers.submit(self._read_reporting, list(keys))
        except RuntimeError:  # closed: a miss, as every other failure
            return [None] * len(keys)
        values, error = read.result()
        if error is not None:
            self._failed("get", error)
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
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._close()

    # -- helpers -------------------------------------------------------------------------------

    def _read_reporting(
        self, keys: list[bytes]
    ) -> tuple[list[memoryview | bytes | None], None] | tuple[None, Exception]:
        """`_read_many` on a reader thread: (values, None), or (None, the error) if it raised."""
        try:
            return self._read_many(keys), None
        except Exception as exc:
            forget_frames(exc)
            return None, exc

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
