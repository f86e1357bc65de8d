"""Where the connector's chunks live: an embedded in-process pool or a remote pool over gRPC.

The connector only ever talks to ``SafePool``: every call has a short deadline, every exception
becomes a miss (logged once per burst, counted), and a pool that keeps failing is skipped for a
while (a small circuit breaker) so that a dead pool costs nothing per request. A cache must never
fail or stall a request; recomputing is always correct.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from . import metrics

log = logging.getLogger("kvpool")


class Pool(Protocol):
    """The few operations the connector needs; values are whole encoded chunks."""

    name: str

    def prefix_hits(self, keys: Sequence[bytes]) -> int: ...
    def get_many(self, keys: Sequence[bytes]) -> list[object | None]: ...
    def put_many(self, items: list[tuple[bytes, bytes]]) -> None: ...
    def delete(self, keys: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


class EmbeddedPool:
    """A ``TieredStore`` inside the engine process: memory, optionally a disk dir that survives
    restarts. Shared by the scheduler-side and worker-side connectors of one process."""

    def __init__(self, memory_bytes: int, disk_dir: str | None = None, disk_bytes: int = 0) -> None:
        from kvpool.cachenode.store import TieredStore

        self._store = TieredStore(memory_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes).start()
        self.name = "embedded pool" + (f" (disk {disk_dir})" if disk_dir else "")

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._store.prefix_hits(list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return list(self._store.get_many(list(keys)))

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._store.put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._store.delete(list(keys))

    def close(self) -> None:
        self._store.close()


class RemotePool:
    """A node, an agent or ``kvpool up`` reached through the kvpool client."""

    def __init__(self, url: str, timeout: float) -> None:
        from kvpool.cachenode import Client

        self._client = Client(url, timeout=timeout)
        self.name = url

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._client.prefix_hits(list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        found = self._client.get_many(list(keys))
        return [found.get(k) for k in keys]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._client.put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._client.delete(list(keys))

    def close(self) -> None:
        self._client.close()


class SafePool:
    """Wraps a pool so that nothing it does can fail or noticeably delay a request.

    * errors → a miss (0 hits, nothing found, write dropped), counted by kind and logged;
    * after ``breaker_failures`` consecutive failures the pool is skipped for ``breaker_s``;
    * writes go through a bounded background queue unless ``sync_writes`` (embedded memory pool,
      where a put is a memcpy and a reader right after expects to see it).
    """

    def __init__(
        self,
        pool: Pool | None,
        *,
        sync_writes: bool = False,
        breaker_failures: int = 3,
        breaker_s: float = 5.0,
        queue_items: int = 256,
    ) -> None:
        self.pool = pool
        self.name = pool.name if pool is not None else "no pool"
        self.sync_writes = sync_writes
        self._breaker_failures = breaker_failures
        self._breaker_s = breaker_s
        self._failures = 0
        self._open_until = 0.0
        self._last_log = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[tuple[bytes, bytes]] | None] = queue.Queue(maxsize=queue_items)
        self._writer: threading.Thread | None = None
        self._closed = False

    # -- failure handling ----------------------------------------------------------------
    def _available(self) -> bool:
        return self.pool is not None and time.monotonic() >= self._open_until

    def _ok(self) -> None:
        self._failures = 0

    def _fail(self, op: str, exc: BaseException) -> None:
        kind = type(exc).__name__
        metrics.ERRORS.labels(kind=f"{op}:{kind}").inc()
        with self._lock:
            self._failures += 1
            if self._failures >= self._breaker_failures:
                self._open_until = time.monotonic() + self._breaker_s
            now = time.monotonic()
            if now - self._last_log > 5.0:
                self._last_log = now
                log.warning("kvpool %s on %s failed (%s: %s); treating as a miss", op, self.name, kind, exc)

    # -- operations ----------------------------------------------------------------------
    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        if not keys or not self._available():
            return 0
        try:
            n = int(self.pool.prefix_hits(keys))
        except Exception as exc:  # any failure is a miss
            self._fail("lookup", exc)
            return 0
        self._ok()
        return max(0, min(n, len(keys)))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = self.pool.get_many(keys)
        except Exception as exc:
            self._fail("get", exc)
            return [None] * len(keys)
        self._ok()
        if len(values) != len(keys):
            return [None] * len(keys)
        return values

    def delete(self, keys: Sequence[bytes]) -> None:
        if keys and self._available():
            try:
                self.pool.delete(keys)
            except Exception as exc:
                self._fail("delete", exc)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> bool:
        """Store encoded chunks; False when the write was dropped (pool down or queue full)."""
        if not items or not self._available() or self._closed:
            return False
        if self.sync_writes:
            return self._put_now(items)
        self._ensure_writer()
        try:
            self._queue.put_nowait(items)
        except queue.Full:
            metrics.ERRORS.labels(kind="put:queue_full").inc()
            return False
        return True

    def _put_now(self, items: list[tuple[bytes, bytes]]) -> bool:
        try:
            self.pool.put_many(items)
        except Exception as exc:
            self._fail("put", exc)
            return False
        self._ok()
        return True

    def _ensure_writer(self) -> None:
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="kvpool-put", daemon=True)
                    self._writer.start()

    def _write_loop(self) -> None:
        while True:
            items = self._queue.get()
            try:
                if items is None:
                    return
                if self._available():
                    self._put_now(items)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for queued writes; used at shutdown and by tests."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
        if self.pool is not None:
            try:
                self.pool.close()
            except Exception as exc:
                log.debug("closing %s: %s", self.name, exc)


class LocalNodePool(EmbeddedPool):
    """The embedded pool, served to the engine's other processes over loopback.

    vLLM's CPU and GPU executors run the worker (which moves the bytes) in another process than
    the scheduler (which only asks "how many leading chunks are there?"). So the worker owns the
    store — loads and saves stay in-process memory copies — and serves lookups to the scheduler
    through a loopback kvpool node whose address it leaves in a rendezvous file named after the
    engine id (both processes know it from the shared kv_transfer_config).
    """

    def __init__(self, memory_bytes: int, disk_dir: str | None, disk_bytes: int, rendezvous: str) -> None:
        from pathlib import Path

        from kvpool.cachenode.node import CacheNode
        from kvpool.cachenode.settings import NodeSettings

        ns = NodeSettings(
            host="127.0.0.1", port=0, http_port=0, data_port=0, memory=memory_bytes,
            disk_dir=Path(disk_dir) if disk_dir else None, disk_size=disk_bytes if disk_dir else 0,
        )  # fmt: skip
        self._node = CacheNode(ns)
        self._node.start(wait_ready=True)
        self._store = self._node.store
        self.name = "embedded pool" + (f" (disk {disk_dir})" if disk_dir else "")
        self.url = self._node.url
        self._rendezvous = rendezvous
        tmp = f"{rendezvous}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.url)
        os.replace(tmp, rendezvous)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            with open(self._rendezvous) as f:
                mine = f.read() == self.url
            if mine:
                os.unlink(self._rendezvous)
        self._node.stop()


class RendezvousPool:
    """The scheduler's view of a worker-owned embedded pool: lookups only, found lazily."""

    def __init__(self, rendezvous: str, timeout: float) -> None:
        self._rendezvous = rendezvous
        self._timeout = timeout
        self._remote: RemotePool | None = None
        self.name = "embedded pool"

    def _pool(self) -> RemotePool:
        if self._remote is None:
            with open(self._rendezvous) as f:  # missing → an error → a miss
                self._remote = RemotePool(f.read().strip(), self._timeout)
        return self._remote

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._pool().prefix_hits(keys)

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return self._pool().get_many(keys)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._pool().put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._pool().delete(keys)

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()


_shared: dict[tuple, SafePool] = {}
_embedded: dict[str, SafePool] = {}  # engine id → this process's worker-owned embedded pool
_shared_lock = threading.Lock()


def rendezvous_path(engine_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)
    return os.path.join(tempfile.gettempdir(), f"kvpool-embedded-{safe}.url")


def open_pool(
    url: str | None,
    *,
    memory_bytes: int,
    disk_dir: str | None,
    disk_bytes: int,
    timeout_s: float,
    engine_id: str = "default",
    owner: bool = True,
) -> SafePool:
    """The pool for one connector. ``url`` set → that remote pool (shared per process).
    Unset → the embedded pool: the worker (``owner``) creates and serves it; a scheduler in the
    same process uses it directly, one in another process looks it up through the rendezvous
    file. A pool that cannot even be opened is a permanent miss, never an engine failure."""
    with _shared_lock:
        if url:
            key = (url, timeout_s)
            if key not in _shared:
                try:
                    _shared[key] = SafePool(RemotePool(url, timeout_s))
                except Exception as exc:
                    _shared[key] = _broken(url, exc)
                atexit.register(_shared[key].close)
            return _shared[key]
        if engine_id in _embedded:
            return _embedded[engine_id]
        path = rendezvous_path(engine_id)
        if not owner:
            return SafePool(RendezvousPool(path, timeout_s))
        try:
            pool = SafePool(LocalNodePool(memory_bytes, disk_dir, disk_bytes, path), sync_writes=True)
        except Exception as exc:
            pool = _broken("embedded", exc)
        _embedded[engine_id] = pool
        atexit.register(pool.close)
        return pool


def _broken(what: str, exc: Exception) -> SafePool:
    log.warning("kvpool: could not open pool %s (%s); running without a cache", what, exc)
    metrics.ERRORS.labels(kind=f"open:{type(exc).__name__}").inc()
    return SafePool(None)
