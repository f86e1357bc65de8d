"""Where the connector's chunks live: an embedded in-process pool, the agent in this pod (its
shared-memory arena), or a remote pool over gRPC.

The connector only ever talks to ``SafePool``: every call has a short deadline, every exception
becomes a miss (logged once per burst, counted), and a pool that keeps failing is skipped for a
while (a small circuit breaker) so that a dead pool costs nothing per request. A cache must never
fail or stall a request; recomputing is always correct.

Reads hand out ``Held`` values (``get_many_into``): a view of the bytes plus ``release()``. A
remote pool receives each value straight into the client's pooled, page-aligned receive buffers
(pinned where CUDA is), so the connector allocates nothing per chunk; ``release()`` returns the
buffer. The embedded pool hands out views of its own memory.
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
from .settings import ConnectorSettings, load_settings

log = logging.getLogger(__name__)


class Held(Protocol):
    """A value read from a pool: ``view`` is valid until ``release()`` (a pooled receive buffer
    goes back to its pool then; call it once the bytes have been copied out)."""

    view: memoryview | None

    def release(self) -> None: ...


class Borrowed:
    """A value that is no pooled buffer (a view of the embedded pool's memory, or bytes): holding
    the view keeps the memory alive, releasing drops it."""

    __slots__ = ("view",)

    def __init__(self, value) -> None:
        self.view: memoryview | None = memoryview(value)

    def release(self) -> None:
        self.view = None


class Pool(Protocol):
    """The few operations the connector needs; values are whole encoded chunks.
    ``get_many_into`` is optional: without it, ``SafePool`` wraps ``get_many``'s values."""

    name: str

    def prefix_hits(self, keys: Sequence[bytes]) -> int: ...
    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]: ...
    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None: ...
    def get_many(self, keys: Sequence[bytes]) -> list[object | None]: ...
    def put_many(self, items: list[tuple[bytes, bytes]]) -> None: ...
    def delete(self, keys: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


class EmbeddedPool:
    """A ``TieredStore`` inside the engine process: memory, optionally a disk dir that survives
    restarts. Shared by the scheduler-side and worker-side connectors of one process."""

    def __init__(self, memory_bytes: int, disk_dir: str | None = None, disk_bytes: int = 0) -> None:
        from kvpool.cachenode.server.tiers.store import TieredStore

        self._store = TieredStore(memory_bytes, disk_dir=disk_dir, disk_bytes=disk_bytes).start()
        self.name = "embedded pool" + (f" (disk {disk_dir})" if disk_dir else "")

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._store.prefix_hits(list(keys))

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._store.lease_prefix(list(keys), lease_ms / 1000)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._store.release(lease_id, None if keys is None else list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return list(self._store.get_many(list(keys)))

    def get_many_into(self, keys: Sequence[bytes]) -> list[Held | None]:
        """Views of the store's memory (no copy); each keeps its range alive until released."""
        return [None if v is None else Borrowed(v) for v in self._store.get_many(list(keys))]

    def put_many(self, items: list[tuple[bytes, object]]) -> None:
        """The store owns what it is given: its disk tier writes it later, from another thread.
        Views of the caller's buffers (the saver's, reused once this returns) are copied first
        where a disk tier will read them after the call; L1 copies into its arena during it."""
        if self._store.disk is not None:
            items = [(k, v if isinstance(v, bytes) else bytes(v)) for k, v in items]
        self._store.put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._store.delete(list(keys))

    def close(self) -> None:
        self._store.close()


def bearer_token(s: ConnectorSettings) -> str | None:
    """The token for a pool with auth on: `auth_token`, else the contents of `auth_token_file`
    (ValueError when that file cannot be read or is empty)."""
    if s.auth_token or not s.auth_token_file:
        return s.auth_token
    from kvpool.cachenode.rpc.auth import load_token

    return load_token(s.auth_token_file)


class _ClientPool:
    """A pool behind a kvpool client object (the routing pool client or the agent client): both
    answer the same calls with dicts keyed by chunk key."""

    def __init__(self, client, name: str) -> None:
        self._client = client
        self.name = name

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._client.prefix_hits(list(keys))

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._client.lease_prefix(list(keys), lease_ms)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._client.release(lease_id, None if keys is None else list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        found = self._client.get_many(list(keys))
        return [found.get(k) for k in keys]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._client.put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._client.delete(list(keys))

    def close(self) -> None:
        self._client.close()


class RemotePool(_ClientPool):
    """A node, an agent or ``kvpool up`` reached through the kvpool client."""

    def __init__(self, url: str, timeout: float, token: str | None = None) -> None:
        from kvpool.cachenode import Client

        super().__init__(Client(url, timeout=timeout, token=token), url)

    def get_many_into(self, keys: Sequence[bytes]) -> list[Held | None]:
        """Each value received straight into a pooled receive buffer of the client."""
        found = self._client.get_many_into(list(keys))
        return [found.pop(k, None) for k in keys]  # a key asked twice is found once


class AgentPool(_ClientPool):
    """The agent in this pod (`kvpool agent`): lookups over gRPC, chunk bytes through the agent's
    shared-memory arena (mapped here; `AgentClient`), so they never cross gRPC in the pod. The
    agent answers lookups for its peers and the cache nodes too, and fetches on a get."""

    def __init__(self, client) -> None:
        super().__init__(client, f"agent {client.agent_id} ({client.url}, shared memory)")


class UrlPool:
    """The pool at KVPOOL_URL: the agent in this pod when the server's Hello says it is an agent
    and its arena file maps here (``AgentPool``); anything else — nodes, `kvpool up`, an agent of
    another pod — through the kvpool client (``RemotePool``). Decided at the first call; a server
    not reachable yet (a sidecar still starting) is asked again at the next one."""

    def __init__(self, url: str, timeout: float, token: str | None = None) -> None:
        self.name = url
        self._url = url
        self._timeout = timeout
        self._token = token
        self._chosen: Pool | None = None
        self._lock = threading.Lock()

    def _pool(self) -> Pool:
        if self._chosen is None:
            with self._lock:
                if self._chosen is None:
                    self._chosen = self._choose()
                    self.name = self._chosen.name
        return self._chosen

    def _choose(self) -> Pool:
        from kvpool.cachenode.client.agent import AgentClient, NotInThisPod, hello
        from kvpool.cachenode.core.urls import parse_urls

        if (
            len(parse_urls(self._url)[0]) == 1
            and hello(self._url, token=self._token, timeout=self._timeout).kind == "agent"
        ):
            client = AgentClient(
                self._url, token=self._token, timeout=self._timeout, name=f"connector (pid {os.getpid()})"
            )
            try:
                client.attach()
            except NotInThisPod as exc:
                client.close()
                log.info("kvpool: %s; reaching the agent over the network instead", exc)
            except BaseException:
                client.close()
                raise
            else:
                log.info("kvpool: using agent %s through its shared-memory arena", client.agent_id)
                return AgentPool(client)
        return RemotePool(self._url, self._timeout, self._token)

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._pool().prefix_hits(keys)

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._pool().lease_prefix(keys, lease_ms)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._pool().release(lease_id, keys)

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return self._pool().get_many(keys)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._pool().put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._pool().delete(keys)

    def close(self) -> None:
        if self._chosen is not None:
            self._chosen.close()


class SafePool:
    """Wraps a pool so that nothing it does can fail or noticeably delay a request.

    * errors → a miss (0 hits, nothing found, write dropped), counted by kind and logged;
    * after ``breaker_failures`` consecutive failures of one kind of call (lookups, reads, writes,
      …) the pool is skipped for ``breaker_s``. Kinds count apart: a pool whose lookups answer but
      whose reads keep timing out must still open the breaker, or every request would find its
      chunks, wait for a read that fails and recompute;
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
        self._failures: dict[str, int] = {}  # kind of call → consecutive failures
        self._open_until = 0.0
        self._last_log = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[tuple[bytes, bytes]] | None] = queue.Queue(maxsize=queue_items)
        self._writer: threading.Thread | None = None
        self._closed = False
        self._abandoned = False  # past the shutdown deadline: queued writes are dropped, not sent
        self._queued_chunks = 0  # chunks handed to the background writer (ever)
        self._stored_chunks = 0  # ... of which written

    # -- failure handling ----------------------------------------------------------------
    def _available(self) -> bool:
        return self.pool is not None and time.monotonic() >= self._open_until

    def _ok(self, op: str) -> None:
        if self._failures.get(op):
            with self._lock:
                self._failures[op] = 0

    def _fail(self, op: str, exc: BaseException) -> None:
        kind = type(exc).__name__
        metrics.ERRORS.labels(kind=f"{op}:{kind}").inc()
        with self._lock:
            self._failures[op] = self._failures.get(op, 0) + 1
            if self._failures[op] >= self._breaker_failures:  # stays open after one more failure
                self._open_until = time.monotonic() + self._breaker_s
            if self._failures[op] == self._breaker_failures:
                log.warning(
                    "kvpool: %d %ss in a row failed on %s; skipping the pool for %.0f s",
                    self._breaker_failures, op, self.name, self._breaker_s,
                )  # fmt: skip
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
        self._ok("lookup")
        return max(0, min(n, len(keys)))

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        """prefix_hits that pins what it found for ``lease_ms`` (0: a plain lookup, no lease)."""
        if lease_ms <= 0:
            return self.prefix_hits(keys), 0
        if not keys or not self._available():
            return 0, 0
        try:
            n, lease_id = self.pool.lease_prefix(keys, lease_ms)
        except Exception as exc:
            self._fail("lookup", exc)
            return 0, 0
        self._ok("lookup")
        return max(0, min(int(n), len(keys))), int(lease_id)

    def release(self, lease_id: int, keys: Sequence[bytes] | None = None) -> None:
        """End (part of) a lease; a failure only means the lease expires by itself."""
        if lease_id and self._available():
            try:
                self.pool.release(lease_id, keys)
            except Exception as exc:
                self._fail("release", exc)

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = self.pool.get_many(keys)
        except Exception as exc:
            self._fail("get", exc)
            return [None] * len(keys)
        self._ok("get")
        if len(values) != len(keys):
            return [None] * len(keys)
        return values

    def get_many_into(self, keys: Sequence[bytes]) -> list[Held | None]:
        """Like ``get_many``, but each value found is ``Held``: release it once read."""
        if not keys or not self._available():
            return [None] * len(keys)
        get = getattr(self.pool, "get_many_into", None)
        try:
            if get is None:
                held = [None if v is None else Borrowed(v) for v in self.pool.get_many(keys)]
            else:
                held = list(get(keys))
        except Exception as exc:
            self._fail("get", exc)
            return [None] * len(keys)
        self._ok("get")
        if len(held) != len(keys):
            for h in held:
                if h is not None:
                    h.release()
            return [None] * len(keys)
        return held

    def delete(self, keys: Sequence[bytes]) -> None:
        if keys and self._available():
            try:
                self.pool.delete(keys)
            except Exception as exc:
                self._fail("delete", exc)

    def write(self, items: list[tuple[bytes, object]]) -> bool:
        """Store now, in the calling thread (for callers that run their own background writer
        and must know when the values were sent); False when the write failed or was skipped."""
        if not items or not self._available() or self._closed:
            return False
        return self._put_now(items)

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
        self._queued_chunks += len(items)
        return True

    def _put_now(self, items: list[tuple[bytes, bytes]]) -> bool:
        try:
            self.pool.put_many(items)
        except Exception as exc:
            self._fail("put", exc)
            return False
        self._ok("put")
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
                if not self._abandoned and self._available() and self._put_now(items):
                    self._stored_chunks += len(items)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) for queued writes; True when none is left. Used at shutdown and by
        tests; takes no lock (safe in a signal handler)."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._queue.unfinished_tasks

    def warm(self) -> None:
        """Open the pool's connections now (one lookup and one read of a key nobody stores), so
        that the first save is not the call that pays for them: at a Ctrl-C, vLLM's API server
        kills the engine processes within milliseconds, and a save still connecting is lost."""
        probe = [b"kvpool-warm-up-probe".ljust(32, b"\0")]
        self.prefix_hits(probe)
        for held in self.get_many_into(probe):
            if held is not None:
                held.release()

    def close(self, timeout: float = 10.0) -> None:
        """Flush the background writer (bounded by ``timeout`` seconds; what is still queued then
        is dropped, and the log says so), then close the pool."""
        if self._closed:
            return
        stored0, t0 = self._stored_chunks, time.monotonic()
        done = self.flush(timeout)
        self._abandoned = True
        self._closed = True
        if self._queued_chunks:  # the background queue was used: say what became of it
            log.info(
                "kvpool: %s write queue flushed in %.1f ms: %d chunks stored then, %d of %d queued "
                "stored in all, %d dropped%s",
                self.name, 1000 * (time.monotonic() - t0), self._stored_chunks - stored0,
                self._stored_chunks, self._queued_chunks, self._queued_chunks - self._stored_chunks,
                "" if done else f" (unwritten at the {1000 * timeout:.0f} ms deadline)",
            )  # fmt: skip
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
    engine id and data-parallel rank (both processes know them from the shared config). Under
    tensor/pipeline parallelism the first worker (TP 0, PP 0) owns the pool and the other workers
    reach it the way the scheduler does: one pool per engine, each rank with its own keys.
    """

    def __init__(self, memory_bytes: int, disk_dir: str | None, disk_bytes: int, rendezvous: str) -> None:
        from pathlib import Path

        from kvpool.cachenode.core.settings import NodeSettings
        from kvpool.cachenode.server.node import CacheNode

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
    """Another process's view of a worker-owned embedded pool (the scheduler's lookups, the other
    tensor/pipeline-parallel workers' loads and saves), found lazily through the rendezvous file."""

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

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._pool().lease_prefix(keys, lease_ms)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._pool().release(lease_id, keys)

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return self._pool().get_many(keys)

    def get_many_into(self, keys: Sequence[bytes]) -> list[Held | None]:
        return self._pool().get_many_into(keys)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._pool().put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._pool().delete(keys)

    def close(self) -> None:
        if self._remote is not None:
            self._remote.close()


_shared: dict[tuple, SafePool] = {}
_embedded: dict[tuple[str, int], SafePool] = {}  # (engine id, DP rank) → this process's owned pool
_shared_lock = threading.Lock()


def rendezvous_path(engine_id: str, dp_rank: int = 0) -> str:
    """One file per engine and data-parallel rank: DP ranks are separate engines (schedulers)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)
    return os.path.join(tempfile.gettempdir(), f"kvpool-embedded-{safe}-dp{dp_rank}.url")


def open_pool(
    url: str | None,
    *,
    memory_bytes: int,
    disk_dir: str | None,
    disk_bytes: int,
    timeout_s: float,
    engine_id: str = "default",
    owner: bool = True,
    dp_rank: int = 0,
    token: str | None = None,
    settings: ConnectorSettings | None = None,
) -> SafePool:
    """The pool for one connector. ``url`` set → that pool (shared per process: the agent in this
    pod through its arena, else a remote pool; ``UrlPool``), sent
    ``token`` (default: the bearer token of ``settings``, else of KVPOOL_AUTH_TOKEN or the file
    KVPOOL_AUTH_TOKEN_FILE) when it has auth on. Unset → the embedded pool: the owning worker creates and serves it; a scheduler or another
    worker in the same process uses it directly, one in another process reaches it through the
    rendezvous file. A pool that cannot even be opened is a permanent miss, never an engine
    failure."""
    with _shared_lock:
        if url:
            key = (url, timeout_s, token)
            if key not in _shared:
                try:
                    auth = token if token is not None else bearer_token(settings or load_settings(None))
                    _shared[key] = SafePool(UrlPool(url, timeout_s, auth))
                except Exception as exc:
                    _shared[key] = _broken(url, exc)
                atexit.register(_shared[key].close)
            return _shared[key]
        ident = (engine_id, dp_rank)
        if ident in _embedded:
            return _embedded[ident]
        path = rendezvous_path(engine_id, dp_rank)
        if not owner:
            return SafePool(RendezvousPool(path, timeout_s))
        try:
            pool = SafePool(LocalNodePool(memory_bytes, disk_dir, disk_bytes, path), sync_writes=True)
        except Exception as exc:
            pool = _broken("embedded", exc)
        _embedded[ident] = pool
        atexit.register(pool.close)
        return pool


def _broken(what: str, exc: Exception) -> SafePool:
    log.warning("kvpool: could not open pool %s (%s); running without a cache", what, exc)
    metrics.ERRORS.labels(kind=f"open:{type(exc).__name__}").inc()
    return SafePool(None)
