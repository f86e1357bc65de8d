"""The holder side: publish a holder's admit/evict events to the lookup service in the background.

An agent or a cache node creates one `Publisher` and calls `admitted(keys)` / `evicted(keys)` after
each change is visible in what its `snapshot()` returns. Those calls never block on the network
and never raise for a service that is down. Events are coalesced per key (the last one wins) and
sent in numbered batches, one in flight at a time, retried with the same number until
acknowledged. The service asks for a full snapshot (a resync) when it does not know the holder
(first contact, after its lease ran out, after the service restarted), on a sequence gap, or for a
new incarnation; the publisher also resyncs on its own when more than `max_pending` distinct keys
wait (memory stays bounded: the snapshot replaces them). Heartbeats keep the lease; they are
always on, at a third of the lease the service announces.

A batch is sent `linger` seconds (10 ms) after its oldest event, or at once when `max_batch`
events already wait, when `flush()` asks or on `stop()`: a holder taking one put per millisecond
then makes one Publish call per burst instead of one per put (each call costs the holder's
process a gRPC round trip: a node made one per put, about 0.25 ms of CPU each on a 2-core machine).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from kvpool.cachenode.client.lookup import open_channel
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import KVPoolError
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.record import MAX_KEY_SIZE
from kvpool.cachenode.rpc import lookup_wire as wire
from kvpool.cachenode.rpc.channels import bearer_metadata
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import translate

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 16384
DEFAULT_MAX_PENDING = 1_000_000
DEFAULT_TIMEOUT_S = 5.0
RESYNC_TIMEOUT_S = 120.0
FRAME_KEYS = 32768
FIRST_HEARTBEAT_S = 1.0  # until the service has told its lease
MAX_BACKOFF_S = 2.0
ERROR_LOG_EVERY_S = 30.0
DEFAULT_LINGER_S = 0.01  # how long a batch waits for more events after its oldest one

_RESYNC = pb.LookupPublishResponse.RESYNC


@dataclass
class _Batch:
    seq: int
    admitted: list[bytes]
    evicted: list[bytes]
    oldest: float  # monotonic time of its oldest event


class Publisher:
    """One per holder process. Use as a context manager, or start() and stop()."""

    def __init__(
        self,
        url: str,
        holder: HolderInfo,
        snapshot: Callable[[], Iterable[bytes]],
        *,
        token: str | None = None,
        tls_ca_file: str | None = None,
        incarnation: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        heartbeat_interval: float | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        linger: float = DEFAULT_LINGER_S,
    ) -> None:
        """`heartbeat_interval` None = a third of the lease the service announces (capped to that).
        `linger`: seconds a batch waits for more events after its oldest one (0: send at once)."""
        wire.holder_info(wire.holder_message(holder))  # raises InvalidRequest for a bad holder now
        if not 1 <= max_batch <= 1_000_000 or max_pending < max_batch:
            raise ValueError("need 1 <= max_batch <= 1000000 and max_pending >= max_batch")
        self.holder = holder
        self.incarnation = incarnation if incarnation is not None else secrets.randbits(63) or 1
        self._snapshot = snapshot
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._heartbeat_interval = heartbeat_interval
        self._timeout = timeout
        self._linger = max(0.0, linger)
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(url, tls_ca_file)
        self._stub = pb_grpc.LookupStub(self._channel)
        self.url = url

        self._lock = threading.Lock()  # guards the fields below
        self._pending: dict[bytes, bool] = {}  # key -> admitted (True) / evicted (False)
        self._oldest: float | None = None
        self._overflowed = False
        self._resync_reason: str | None = "start"
        self._inflight: _Batch | None = None
        self._seq = 0  # the last sequence number used
        self._acked = 0  # the last one the service acknowledged
        self._lease_s: float | None = None
        self._last_contact = 0.0
        self._authoritative = False

        self.counters = {"batches": 0, "events": 0, "resyncs": 0, "overflows": 0, "errors": 0}
        self.last_error = ""
        self._last_error_log = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._hurry = threading.Event()  # flush() and stop() cut a batch's linger short
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="kvpool-lookup-publisher", daemon=True)

    # -- the holder's calls ------------------------------------------------------------------
    def admitted(self, keys: Iterable[bytes]) -> None:
        self._record(keys, True)

    def evicted(self, keys: Iterable[bytes]) -> None:
        self._record(keys, False)

    def _record(self, keys: Iterable[bytes], admit: bool) -> None:
        keys = [bytes(k) for k in keys]
        for key in keys:
            if not 0 < len(key) <= MAX_KEY_SIZE:
                raise ValueError(f"keys must be 1..{MAX_KEY_SIZE} bytes, got {len(key)}")
        with self._lock:
            if self._overflowed:
                return  # the resync that is due sends a snapshot taken after these changes
            pending = self._pending
            for key in keys:
                pending[key] = admit
            if self._oldest is None and pending:
                self._oldest = time.monotonic()
            if len(pending) > self._max_pending:
                pending.clear()
                self._oldest = None
                self._overflowed = True
                self._resync_reason = f"more than {self._max_pending} events waiting"
                self.counters["overflows"] += 1
                metrics.PUBLISHER_OVERFLOWS.inc()
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Publisher:
        self._thread.start()
        return self

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, flush_timeout: float = 2.0) -> None:
        """Try to deliver what waits (up to `flush_timeout`), then stop and close the channel."""
        if self._thread.is_alive() and flush_timeout > 0:
            self.flush(flush_timeout)
        self._stop.set()
        self._hurry.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._timeout + 1)
        self._channel.close()

    def flush(self, timeout: float) -> bool:
        """Wait until every recorded event is acknowledged (or the timeout); True if it was."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or self._inflight or self._resync_reason:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._hurry.set()
                self._wake.set()
                self._idle.wait(min(left, 0.05))
        self._hurry.clear()  # events recorded from now on linger again
        return True

    def stats(self) -> dict:
        with self._lock:
            return {
                "holder_id": self.holder.holder_id,
                "incarnation": self.incarnation,
                "seq": self._seq,
                "acked": self._acked,
                "pending": len(self._pending),
                "resync_due": self._resync_reason,
                "lease_s": self._lease_s,
                "authoritative": self._authoritative,
                "last_error": self.last_error,
                **self.counters,
            }

    # -- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if self._resync_reason:
                    self._resync()
                elif self._inflight or self._pending:
                    self._linger_for_more()
                    self._send_batch()
                elif time.monotonic() - self._last_contact >= self._heartbeat_every():
                    self._heartbeat()
                else:
                    with self._lock:
                        self._idle.notify_all()
                    wait = self._heartbeat_every() - (time.monotonic() - self._last_contact)
                    self._wake.wait(max(0.0, wait))
                    self._wake.clear()
                    continue
                backoff = 0.05
            except Exception as exc:  # the service is down or slow: keep the events, retry later
                self._failed(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _heartbeat_every(self) -> float:
        if self._lease_s is None:
            return FIRST_HEARTBEAT_S
        third = self._lease_s / 3
        return min(self._heartbeat_interval or third, third)

    def _resync(self) -> None:
        with self._lock:
            reason = self._resync_reason
            self._pending.clear()  # the snapshot below covers every change made before it
            self._oldest = None
            self._overflowed = False
            self._inflight = None
            self._seq += 1
            seq = self._seq
        count = 0

        def frames():
            nonlocal count
            header = pb.LookupResyncFrame(
                holder=wire.holder_message(self.holder), incarnation=self.incarnation, seq=seq
            )
            keys = iter(self._snapshot())
            while True:
                chunk = list(itertools.islice(keys, FRAME_KEYS))
                count += len(chunk)
                if header is not None:
                    header.keys.extend(wire.pack_keys(chunk))
                    yield header
                    header = None
                elif chunk:
                    yield pb.LookupResyncFrame(keys=wire.pack_keys(chunk))
                if len(chunk) < FRAME_KEYS:
                    return

        try:
            response = self._stub.Resync(frames(), timeout=RESYNC_TIMEOUT_S, metadata=self._metadata)
        except BaseException:
            with self._lock:
                self._resync_reason = self._resync_reason or reason  # try again, with a new seq
            raise
        with self._lock:
            if response.status == _RESYNC:
                self._resync_reason = f"service refused the snapshot: {response.reason}"
            elif self._resync_reason == reason:
                self._resync_reason = None
            self._acked = max(self._acked, seq)
            self.counters["resyncs"] += 1
        metrics.PUBLISHER_RESYNCS.inc()
        self._contact(response)
        log.info(
            "%s %s: sent a snapshot of %d keys to %s (%s)", self.holder.kind, self.holder.holder_id,
            count, self.url, reason,
        )  # fmt: skip

    def _linger_for_more(self) -> None:
        """Before a new batch, wait until its oldest event is `linger` old (or max_batch wait)."""
        with self._lock:
            if self._inflight is not None or self._oldest is None or len(self._pending) >= self._max_batch:
                return
            wait = self._linger - (time.monotonic() - self._oldest)
        if wait > 0:
            self._hurry.wait(wait)
        self._hurry.clear()

    def _send_batch(self) -> None:
        with self._lock:
            if self._inflight is None:
                self._inflight = self._take_batch()
            batch = self._inflight
            waiting = len(self._pending)
        request = pb.LookupPublishRequest(
            holder_id=self.holder.holder_id,
            incarnation=self.incarnation,
            seq=batch.seq,
            admitted=wire.pack_keys(batch.admitted),
            evicted=wire.pack_keys(batch.evicted),
            oldest_event_age_s=max(0.0, time.monotonic() - batch.oldest),
            pending=waiting,
        )
        response = self._stub.Publish(request, timeout=self._timeout, metadata=self._metadata)
        with self._lock:
            if self._inflight is batch:
                self._inflight = None
                if response.status == _RESYNC:
                    self._resync_reason = f"service asked: {response.reason}"
                else:  # OK, or DUPLICATE: an earlier try of this batch got through
                    self._acked = batch.seq
                    self.counters["batches"] += 1
                    self.counters["events"] += len(batch.admitted) + len(batch.evicted)
        if response.status != _RESYNC:
            metrics.PUBLISHER_EVENTS.inc(len(batch.admitted) + len(batch.evicted))
        self._contact(response)

    def _take_batch(self) -> _Batch:
        """The next batch from the pending events (lock held)."""
        pending = self._pending
        if len(pending) <= self._max_batch:
            items, self._pending = pending, {}
        else:
            items = dict(itertools.islice(pending.items(), self._max_batch))
            for key in items:
                del pending[key]
        oldest = self._oldest if self._oldest is not None else time.monotonic()
        self._oldest = oldest if self._pending else None
        self._seq += 1
        admitted = [k for k, admit in items.items() if admit]
        evicted = [k for k, admit in items.items() if not admit]
        return _Batch(self._seq, admitted, evicted, oldest)

    def _heartbeat(self) -> None:
        with self._lock:
            request = pb.LookupHeartbeatRequest(
                holder_id=self.holder.holder_id,
                incarnation=self.incarnation,
                seq=self._acked,
                pending=len(self._pending),
            )
        response = self._stub.Heartbeat(request, timeout=self._timeout, metadata=self._metadata)
        if response.status == _RESYNC:
            with self._lock:
                self._resync_reason = f"service asked: {response.reason}"
        self._contact(response)

    def _contact(self, response: pb.LookupPublishResponse) -> None:
        self._last_contact = time.monotonic()
        if response.lease_s > 0:
            self._lease_s = response.lease_s
        self._authoritative = response.authoritative
        with self._lock:
            self._idle.notify_all()

    def _failed(self, exc: Exception) -> None:
        error = translate(exc) if isinstance(exc, grpc.RpcError) else exc
        self.counters["errors"] += 1
        metrics.PUBLISHER_ERRORS.inc()
        self.last_error = str(error)
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            kept = "kept and resent" if isinstance(error, KVPoolError) else "covered by the next snapshot"
            log.warning(
                "%s %s: lookup service at %s: %s; events are %s", self.holder.kind,
                self.holder.holder_id, self.url, error, kept,
            )  # fmt: skip
