"""The bounded write-behind queue: the store's disk writes, the shared tiers', the agent's pool.

Why: a put is acknowledged once the fast tier has it; the slower one is written behind the
request, so a slow or dead tier never adds latency. The queue is bounded in records and in bytes;
when full, the oldest pending write is dropped (and counted) — memory never grows with an outage.
A newer put of the same key replaces the pending one (only the latest bytes matter).

While the tier's gate is shut (its breaker is open) the workers wait instead of draining the queue
into errors, so when the tier comes back the most recent writes are still there and go out
first-in-first-out. A batch that fails is put back at the front (if nothing newer replaced it) up
to `max_attempts`.

A write being written is "in flight": `discard` revokes it as well as dropping pending ones, and
the writer may ask `still_wanted(key)` just before it commits (the disk tier does, before its
rename), so a delete racing a late write never brings the key back.
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

Value = memoryview | bytes
Batch = Sequence[tuple[bytes, Value]]


class Skipped(Exception):
    """Raised by a batch writer that did not try (breaker busy): retry later, not a failed attempt."""


@dataclass(slots=True)
class _Item:
    value: Value
    size: int
    attempts: int = 0


def stable_bytes(value: memoryview | bytes | bytearray) -> Value:
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
    """Records waiting for one tier; `writer(batch)` writes a batch of (key, value) or raises.

    `copy_values=False` keeps the caller's buffers as they are (for an owner that hands them
    over, the store); `max_items=None` bounds the queue in bytes only; `autostart=False` waits
    for `start()` before writing anything (the store first rebuilds its disk index).
    """

    def __init__(
        self,
        tier: str,
        writer: Callable[[Batch], None],
        *,
        gate: Callable[[], float] = lambda: 0.0,
        max_items: int | None = 1024,
        max_bytes: int = 512 * 1024 * 1024,
        workers: int = 2,
        batch_items: int = 16,
        batch_bytes: int = 64 * 1024 * 1024,
        max_attempts: int = 3,
        copy_values: bool = True,
        idle_wait: float | None = None,
        autostart: bool = True,
    ) -> None:
        self.tier = tier
        self._writer = writer
        self._gate = gate
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._workers = workers
        self._batch_items = batch_items
        self._batch_bytes = batch_bytes
        self._max_attempts = max_attempts
        self._copy = copy_values
        self._idle_wait = idle_wait
        self._pending: OrderedDict[bytes, _Item] = OrderedDict()
        self._bytes = 0
        self._in_flight = 0
        self._writing: dict[bytes, _Item] = {}  # key -> the newest write of it in flight
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.written = 0
        self._threads: list[threading.Thread] = []
        if autostart:
            self.start()

    def start(self) -> None:
        """Start the workers (once)."""
        with self._cond:
            if self._threads or self._closed:
                return
            self._threads = [
                threading.Thread(target=self._run, name=f"kvpool-{self.tier}-writer-{i}", daemon=True)
                for i in range(self._workers)
            ]
        for t in self._threads:
            t.start()

    # -- producer side -------------------------------------------------------------------------

    def submit(self, key: bytes, value: memoryview | bytes | bytearray) -> list[tuple[bytes, Value]]:
        """Queue a write and return at once; drops the oldest pending writes to stay in bounds.

        Returns the writes dropped, oldest first: the new one itself when it can never fit (or
        the queue is closed).
        """
        if self._copy:
            value = stable_bytes(value)
        size = memoryview(value).nbytes
        with self._cond:
            if self._closed or size > self.max_bytes:
                self._drop(1)
                return [(key, value)]
            old = self._pending.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._pending[key] = _Item(value, size)
            self._bytes += size
            dropped = self._trim()
            self._publish_depth()
            self._cond.notify()
        return dropped

    def discard(self, keys: Sequence[bytes]) -> int:
        """Forget pending writes of deleted keys and revoke those in flight (see still_wanted), so
        a late write cannot bring them back; returns how many pending writes were forgotten.

        A writer that does not ask `still_wanted` can still land a batch after the delete; the
        shared tiers' delete also deletes from the tier itself, which covers writes that landed
        before it.
        """
        removed = 0
        with self._cond:
            for key in keys:
                self._writing.pop(key, None)
                item = self._pending.pop(key, None)
                if item is not None:
                    self._bytes -= item.size
                    removed += 1
            if removed:
                self._publish_depth()
                self._cond.notify_all()
        return removed

    # -- what is queued ------------------------------------------------------------------------

    def __contains__(self, key: bytes) -> bool:
        """Pending (not yet taken by a worker)."""
        return key in self._pending

    def value_of(self, key: bytes) -> Value | None:
        """The pending value of `key`, or None."""
        with self._cond:
            item = self._pending.get(key)
            return None if item is None else item.value

    def size_of(self, key: bytes) -> int | None:
        with self._cond:
            item = self._pending.get(key)
            return None if item is None else item.size

    def pending_keys(self) -> list[bytes]:
        """The pending keys, oldest first."""
        with self._cond:
            return list(self._pending)

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def in_flight(self, key: bytes) -> bool:
        """A worker is writing `key` and no discard has revoked it."""
        return key in self._writing

    def still_wanted(self, key: bytes) -> bool:
        """For the writer, just before it commits `key`: False once a discard revoked it."""
        with self._cond:
            return key in self._writing

    def done(self, key: bytes) -> bool:
        """For a single-worker writer that settles each write itself: `key` is written (or given
        up) now; True when it was still wanted. Lets the writer end the in-flight state inside
        its own critical section rather than after the batch returns."""
        with self._cond:
            return self._writing.pop(key, None) is not None

    # -- waiting and stopping ------------------------------------------------------------------

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
                    self._cond.wait(self._idle_wait)
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
                self._settle(batch, written=False, count_attempt=False)
                time.sleep(0.01)
            except Exception as exc:  # a tier error must never kill the worker
                log.debug("background write to %s failed: %s", self.tier, exc)
                self._settle(batch, written=False, count_attempt=True)
            except BaseException:
                self._settle(batch, written=False, count_attempt=True)
                raise
            else:
                self._settle(batch, written=True, count_attempt=False)

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
                self._writing[key] = item
                batch.append((key, item))
                size += item.size
            self._in_flight += len(batch)
            self._publish_depth()
            return batch

    def _settle(self, batch: list[tuple[bytes, _Item]], *, written: bool, count_attempt: bool) -> None:
        """End a batch's flight in one critical section: a failed write still wanted (not revoked
        by a discard nor superseded by a newer write in flight) goes back to the front."""
        with self._cond:
            current = []
            for key, item in batch:
                if self._writing.get(key) is item:
                    del self._writing[key]
                    current.append((key, item))
            self._in_flight -= len(batch)
            if written:
                self.written += len(batch)
            elif self._closed:
                self._drop(len(current))
            else:
                self._requeue(current, count_attempt=count_attempt)
            self._cond.notify_all()

    def _requeue(self, batch: list[tuple[bytes, _Item]], *, count_attempt: bool) -> None:
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

    def _trim(self) -> list[tuple[bytes, Value]]:
        dropped: list[tuple[bytes, Value]] = []
        while self._pending and (
            (self.max_items is not None and len(self._pending) > self.max_items)
            or self._bytes > self.max_bytes
        ):
            key, item = self._pending.popitem(last=False)
            self._bytes -= item.size
            dropped.append((key, item.value))
        if dropped:
            self._drop(len(dropped))
        return dropped

    def _drop(self, n: int) -> None:
        self.dropped += n
        metrics.TIER_DROPPED_WRITES.labels(self.tier).inc(n)

    def _publish_depth(self) -> None:
        metrics.TIER_QUEUE_DEPTH.labels(self.tier).set(len(self._pending))
