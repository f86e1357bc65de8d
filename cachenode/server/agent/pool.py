"""The cache nodes behind an agent (--pool-url): where its misses are read from after its peers,
and where the chunks its connector writes go, in the background.

Reads go through the pool `Client` (rendezvous placement, handoff, per-node breakers, NIXL to
same-host nodes). Writes go through a bounded write-behind queue (the shared tiers' own,
`core.writebehind.WriteBehindQueue`): the connector's commit returns once the chunk is in the
arena; the queue drops its oldest writes rather than grow, and waits while the pool is down. A
breaker over the whole pool skips it for a while after failures, so a pool that is down costs a
request nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from kvpool.cachenode.client.buffers import PooledBuffer
from kvpool.cachenode.client.pool import Client
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.errors import KVPoolError
from kvpool.cachenode.core.writebehind import Skipped, WriteBehindQueue

log = logging.getLogger(__name__)

QUEUE_NAME = "pool"
BREAKER_FAILURES = 2
BREAKER_RESET_S = 1.0
BREAKER_MAX_RESET_S = 10.0
FLUSH_ON_STOP_S = 5.0


class PoolLink:
    """Thread-safe; close() after use."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        timeout: float,
        tls_ca_file: str | None,
        queue_items: int,
        queue_bytes: int,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.url = url
        self.client = Client(url, timeout=timeout, token=token, tls_ca_file=tls_ca_file, transport="auto")

        def on_change(state: State) -> None:
            if state is State.OPEN:
                log.warning("pool %s failed; skipped for a while (misses stay misses)", url)
            elif state is State.CLOSED:
                log.info("pool %s answers again", url)

        self.breaker = CircuitBreaker(
            failure_threshold=BREAKER_FAILURES,
            reset_timeout=BREAKER_RESET_S,
            max_reset_timeout=BREAKER_MAX_RESET_S,
            on_change=on_change,
        )
        self._executor = executor
        self.queue = WriteBehindQueue(
            QUEUE_NAME, self._write, gate=self.breaker.retry_in, max_items=queue_items, max_bytes=queue_bytes
        )

    # -- reads ---------------------------------------------------------------------------------

    def prefix(self, keys: Sequence[bytes], lease_ms: int, lease_id: int) -> tuple[int, bool]:
        """Leading keys the pool holds, pinned there under `lease_id` when `lease_ms`; (count,
        pinned). A pool that fails or is skipped holds nothing."""
        if not keys or not self.breaker.allow():
            return 0, False
        try:
            if lease_ms:
                count, pinned = self.client.lease_prefix(keys, lease_ms, lease_id)
            else:
                count, pinned = self.client.prefix_hits(keys), 0
        except KVPoolError as exc:
            self._failed("prefix", exc)
            return 0, False
        self.breaker.record_success()
        return count, bool(pinned)

    def get_many_into(self, keys: Sequence[bytes]) -> dict[bytes, PooledBuffer]:
        """What the pool holds of `keys`, in the client's pooled buffers (the caller releases)."""
        if not keys or not self.breaker.allow():
            return {}
        try:
            found = self.client.get_many_into(keys)
        except KVPoolError as exc:
            self._failed("get", exc)
            return {}
        self.breaker.record_success()
        return found

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        """End the pool's part of a lease, in the background (a failure lets it expire)."""
        if lease_id:
            self._executor.submit(self._release, lease_id, None if keys is None else list(keys))

    def _release(self, lease_id: int, keys: list[bytes] | None) -> None:
        try:
            self.client.release(lease_id, keys)
        except KVPoolError as exc:
            log.debug("releasing lease %d in the pool failed: %s", lease_id, exc)

    # -- writes --------------------------------------------------------------------------------

    def write_through(self, key: bytes, value) -> None:
        """Queue a chunk for the cache nodes; returns at once."""
        self.queue.submit(key, value)
        metrics.AGENT_WRITE_THROUGH.labels("queued").inc()

    def _write(self, items: Sequence[tuple[bytes, memoryview | bytes]]) -> None:
        if not self.breaker.allow():
            raise Skipped()
        try:
            self.client.put_many(items)
        except KVPoolError as exc:
            self._failed("put", exc)
            metrics.AGENT_WRITE_THROUGH.labels("failed").inc(len(items))
            raise
        self.breaker.record_success()
        metrics.AGENT_WRITE_THROUGH.labels("written").inc(len(items))

    # -- lifecycle -----------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "url": self.url,
            "breaker": self.breaker.state.value,
            "write_queue": self.queue.depth(),
            "written": self.queue.written,
            "dropped": self.queue.dropped,
        }

    def close(self, flush_timeout: float = FLUSH_ON_STOP_S) -> None:
        """Give queued writes `flush_timeout` seconds, then stop."""
        self.queue.close(timeout=flush_timeout)
        self.client.close()

    def _failed(self, op: str, exc: KVPoolError) -> None:
        self.breaker.record_failure()
        metrics.AGENT_FETCH_ERRORS.labels("pool").inc()
        log.debug("pool %s: %s failed: %s", self.url, op, exc)
