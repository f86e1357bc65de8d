"""Bounded write-behind queue shared by the Redis/Valkey and S3 tiers.

Why: a put is acknowledged once L1 has it; shared tiers are written behind the request so a slow
or dead tier never adds latency. The queue is bounded in records and in bytes; when full, the
oldest pending write is dropped (and counted) — memory never grows with an outage. A newer put of
the same key replaces the pending one (only the latest bytes matter).

While the tier's breaker is open the workers wait instead of draining the queue into errors, so
when the tier comes back the most recent writes are still there and go out first-in-first-out.
A batch that fails is put back at the front (if nothing newer replaced it) up to `max_attempts`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvpool.cachenode.core import metrics

log = logging.getLogger(__name__)


class Skipped(Exception):
    """Raised by a batch writer that did not try (breaker busy): retry later, not a failed attempt."""


@dataclass(slots=True)
class _Item:
    value: memoryview | bytes
    size: int
    attempts: int = 0


def stable_bytes(value: memoryview | bytes | bytearray) -> memoryview | bytes:
    """A value that cannot change under us while queued: immutable bytes are kept, anything
    else (an arena slice the store may reuse, a bytearray) is copied once."""
    if isinstance(value, bytes):
        return value
    view = memoryview(value)
    if view.readonly and isinstance(view.obj, bytes) and view.contiguous:
        if view.format == "B" and view.ndim == 1:
            return value if isinstance(value, memoryview) else view
        return view.cast("B")
    return bytes(view)


class WriteBehindQueue:
    """Records waiting for one tier; `writer(batch)` writes a batch or raises."""

    def __init__(
        self,
        tier: str,
        writer: Callable[[Sequence[tuple[bytes, memoryview | bytes]]], None],
        *,
        gate: Callable[[], float] = lambda: 0.0,
        max_items: int = 1024,
        max_bytes: int = 512 * 1024 * 1024,
        workers: int = 2,
        batch_items: int = 16,
        batch_bytes: int = 64 * 1024 * 1024,
        max_attempts: int = 3,
    ) -> None:
        self.tier = tier
        self._writer = writer
        self._gate = gate
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._batch_items = batch_items
        self._batch_bytes = batch_bytes
        self._max_attempts = max_attempts
        self._pending: OrderedDict[bytes, _Item] = OrderedDict()
        self._bytes = 0
        self._in_flight = 0
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.written = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"kvpool-{tier}-writer-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # -- producer side -------------------------------------------------------------------------

    def submit(self, key: bytes, value: memoryview | bytes | bytearray) -> None:
        """Queue a write and return at once; drops the oldest pending writes to stay in bounds."""
        value = stable_bytes(value)
        size = memoryview(value).nbytes
        with self._cond:
            if self._closed:
                self._drop(1)
                return
            if size > self.max_bytes:
                self._drop(1)
                return
            old = self._pending.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._pending[key] = _Item(value, size)
            self._bytes += size
            self._trim()
            self._publish_depth()
            self._cond.notify()

    def discard(self, keys: Sequence[bytes]) -> int:
        """Forget pending writes of deleted keys, so a late write cannot bring them back.

        A batch already being written can still land after the delete; the store's delete also
        deletes from the tier itself, which covers writes that landed before it.
        """
        removed = 0
        with self._cond:
            for key in keys:
                item = self._pending.pop(key, None)
                if item is not None:
                    self._bytes -= item.size
                    removed += 1
            if removed:
                self._publish_depth()
                self._cond.notify_all()
        return removed

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is pending or being written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def close(self, timeout: float = 0.0) -> None:
        """Stop the workers; pending writes are given `timeout` seconds, then dropped."""
        if timeout > 0:
            self.flush(timeout)
        with self._cond:
            self._closed = True
            n = len(self._pending)
            self._pending.clear()
            self._bytes = 0
            if n:
                self._drop(n)
            self._publish_depth()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=2.0)

    # -- worker side ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            delay = self._gate()
            if delay > 0:
                with self._cond:
                    self._cond.wait(min(delay, 0.25))
                continue
            batch = self._take()
            if not batch:
                continue
            try:
                self._writer([(k, it.value) for k, it in batch])
            except Skipped:
                self._requeue(batch, count_attempt=False)
                time.sleep(0.01)
            except Exception as exc:  # a tier error must never kill the worker
                log.debug("background write to %s failed: %s", self.tier, exc)
                self._requeue(batch, count_attempt=True)
            else:
                with self._cond:
                    self.written += len(batch)
            finally:
                with self._cond:
                    self._in_flight -= len(batch)
                    self._cond.notify_all()

    def _take(self) -> list[tuple[bytes, _Item]]:
        with self._cond:
            batch: list[tuple[bytes, _Item]] = []
            size = 0
            while self._pending and len(batch) < self._batch_items:
                key, item = next(iter(self._pending.items()))
                if batch and size + item.size > self._batch_bytes:
                    break
                del self._pending[key]
                self._bytes -= item.size
                batch.append((key, item))
                size += item.size
            self._in_flight += len(batch)
            self._publish_depth()
            return batch

    def _requeue(self, batch: list[tuple[bytes, _Item]], *, count_attempt: bool) -> None:
        with self._cond:
            if self._closed:
                self._drop(len(batch))
                return
            for key, item in reversed(batch):
                if count_attempt:
                    item.attempts += 1
                if key in self._pending:
                    continue  # a newer write of this key is already waiting
                if item.attempts >= self._max_attempts:
                    self._drop(1)
                    continue
                self._pending[key] = item
                self._pending.move_to_end(key, last=False)
                self._bytes += item.size
            self._trim()
            self._publish_depth()

    # -- bookkeeping (call with the lock held) -------------------------------------------------

    def _trim(self) -> None:
        while self._pending and (len(self._pending) > self.max_items or self._bytes > self.max_bytes):
            _, item = self._pending.popitem(last=False)
            self._bytes -= item.size
            self._drop(1)

    def _drop(self, n: int) -> None:
        self.dropped += n
        metrics.TIER_DROPPED_WRITES.labels(self.tier).inc(n)

    def _publish_depth(self) -> None:
        metrics.TIER_QUEUE_DEPTH.labels(self.tier).set(len(self._pending))


class BackgroundTier:
    """What the Redis and S3 tiers share: the SharedTier contract around three raw operations.

    A subclass implements `_read_many` (verified values or None; raises only when the tier itself
    failed), `_write_many` and `_delete_many`. This class adds the circuit breaker, the bounded
    write-behind queue, the write policy (through / back), and per-tier metrics, and makes sure
    nothing raises into the store.
    """

    name: str = "tier"

    def __init__(self, name: str, policy) -> None:
        from kvpool.cachenode.core.breaker import STATE_VALUE, CircuitBreaker, State

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
