"""The pool as the connector holds it: ``SafePool``, and ``open_pool``, which picks the pool
(KVPOOL_URL's, or the embedded one) and shares it within the process.

The connector only ever talks to ``SafePool``: every call has a short deadline, every exception
becomes a miss (logged once per burst, counted), and a pool that keeps failing is skipped for a
while (the circuit breaker of core/breaker.py) so that a dead pool costs nothing per request. A
cache must never fail or stall a request; recomputing is always correct.
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence

from kvpool.cachenode.core.breaker import CircuitBreaker
from kvpool.cachenode.core.settings import ConnectorSettings, load_settings

from . import metrics, miss_reasons
from .pools import Borrowed, Held, Pool, RendezvousPool, UrlPool

log = logging.getLogger(__name__)

NO_EMBEDDED_POOL = "no embedded pool in this install; set KVPOOL_URL"


class SafePool:
    """Wraps a pool so that nothing it does can fail or noticeably delay a request.

    * errors → a miss (0 hits, nothing found, write dropped), counted by kind and logged;
    * after ``breaker_failures`` consecutive failures of one kind of call (lookups, reads, writes,
      …) the pool is skipped for ``breaker_s``, then one call probes it. Kinds count apart: a
      pool whose lookups answer but whose reads keep timing out must still open the breaker, or
      every request would find its chunks, wait for a read that fails and recompute;
    * writes run in the caller's thread: the worker's saver (connector/saver.py) is the
      connector's background writer.
    """

    def __init__(
        self,
        pool: Pool | None,
        *,
        breaker_failures: int = 3,
        breaker_s: float = 5.0,
        deadline_s: float | None = None,
    ) -> None:
        self.pool = pool
        self._deadline_s = deadline_s  # each call's deadline, if known: a failure that late is a timeout
        self.name = pool.name if pool is not None else "no pool"
        self._breaker = CircuitBreaker(
            failure_threshold=breaker_failures, reset_timeout=breaker_s, max_reset_timeout=breaker_s
        )
        self._last_log = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._get_why = threading.local()  # why this thread's last get_many_into had no answer

    # -- failure handling ----------------------------------------------------------------
    def _available(self) -> bool:
        """May a call go to the pool now (hands out the breaker's probe when one is due)."""
        return self.pool is not None and self._breaker.allow()

    def skipping(self) -> bool:
        """True while calls are not sent to the pool (none, or its breaker open with no probe
        due): they answer misses at once, so nobody should wait for one. Changes no state."""
        return self.pool is None or self._breaker.retry_in() > 0

    def _error_kind(self, exc: BaseException, started: float) -> str:
        """``timeout`` (the error says so, or it came at the call's deadline) or ``error``."""
        late = self._deadline_s is not None and time.monotonic() - started >= 0.9 * self._deadline_s
        return "timeout" if late else miss_reasons.pool_error_kind(exc)

    def _ok(self, op: str) -> None:
        self._breaker.record_success(op)

    def _fail(self, op: str, exc: BaseException) -> None:
        kind = type(exc).__name__
        metrics.ERRORS.labels(kind=f"{op}:{kind}").inc()
        if self._breaker.record_failure(op):
            b = self._breaker
            log.warning(
                "kvpool: %d %ss in a row failed on %s; skipping the pool for %.0f s",
                b.failure_threshold, op, self.name, b.reset_timeout,
            )  # fmt: skip
        with self._lock:
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
        n, lease_id, _why = self.lookup(keys, lease_ms)
        return n, lease_id

    def _unavailable_why(self) -> str:
        """Why a call is not sent (a ``miss_reasons.POOL_UNREACHABLE`` detail)."""
        return "no_pool" if self.pool is None else "breaker_open"

    def lookup(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int, str | None]:
        """``lease_prefix``, and why the pool gave no answer (None: it answered): ``no_pool``,
        ``breaker_open``, ``timeout`` or ``error`` — the miss reason of what it did not find."""
        if not keys:
            return 0, 0, None
        if not self._available():
            return 0, 0, self._unavailable_why()
        started = time.monotonic()
        try:
            if lease_ms <= 0:
                n, lease_id = self.pool.prefix_hits(keys), 0
            else:
                n, lease_id = self.pool.lease_prefix(keys, lease_ms)
        except Exception as exc:  # any failure is a miss
            self._fail("lookup", exc)
            return 0, 0, self._error_kind(exc, started)
        self._ok("lookup")
        return max(0, min(int(n), len(keys))), int(lease_id), None

    def release(self, lease_id: int, keys: Sequence[bytes] | None = None) -> None:
        """End (part of) a lease; a failure only means the lease expires by itself."""
        if lease_id and self._available():
            try:
                self.pool.release(lease_id, keys)
            except Exception as exc:
                self._fail("release", exc)
            else:
                self._ok("release")

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
        self._get_why.value = None
        if not keys:
            return []
        if not self._available():
            why = self._unavailable_why()
            self._get_why.value = "pool_error" if why == "no_pool" else why
            return [None] * len(keys)
        get = getattr(self.pool, "get_many_into", None)
        started = time.monotonic()
        try:
            if get is None:
                held = [None if v is None else Borrowed(v) for v in self.pool.get_many(keys)]
            else:
                held = list(get(keys))
        except Exception as exc:
            self._fail("get", exc)
            timeout = self._error_kind(exc, started) == "timeout"
            self._get_why.value = "timeout" if timeout else "pool_error"
            return [None] * len(keys)
        self._ok("get")
        if len(held) != len(keys):
            for h in held:
                if h is not None:
                    h.release()
            self._get_why.value = "pool_error"
            return [None] * len(keys)
        return held

    def fetch_into(self, keys: Sequence[bytes]) -> tuple[list[Held | None], str | None]:
        """``get_many_into``, and why the pool gave no answer (None: it answered, and a None
        value is a key it does not hold): ``breaker_open`` (or ``pool_error`` without a pool),
        ``timeout`` or ``pool_error`` — a ``miss_reasons.LOAD_FAILED`` detail."""
        held = self.get_many_into(keys)
        return held, getattr(self._get_why, "value", None)

    def delete(self, keys: Sequence[bytes]) -> None:
        if keys and self._available():
            try:
                self.pool.delete(keys)
            except Exception as exc:
                self._fail("delete", exc)
            else:
                self._ok("delete")

    def put_many(self, items: list[tuple[bytes, object]]) -> bool:
        """Store encoded chunks now, in the calling thread; False when the write failed or was
        skipped (pool down, breaker open, pool closed)."""
        if not items or self._closed or not self._available():
            return False
        try:
            self.pool.put_many(items)
        except Exception as exc:
            self._fail("put", exc)
            return False
        self._ok("put")
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Nothing is ever queued here (writes run in the caller's thread): True at once. Kept
        for the scheduler side's shutdown, which flushes the pool it holds."""
        return True

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
        """Close the pool (once). ``timeout`` is unused: no write is left to wait for here."""
        if self._closed:
            return
        self._closed = True
        if self.pool is not None:
            try:
                self.pool.close()
            except Exception as exc:
                log.debug("closing %s: %s", self.name, exc)


def bearer_token(s: ConnectorSettings) -> str | None:
    """The token for a pool with auth on: `auth_token`, else the contents of `auth_token_file`
    (ValueError when that file cannot be read or is empty)."""
    if s.auth_token or not s.auth_token_file:
        return s.auth_token
    from kvpool.cachenode.rpc.auth import load_token

    return load_token(s.auth_token_file)


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
    pod through its arena, else a remote pool; ``UrlPool``), sent ``token`` (default: the bearer
    token of ``settings``, else of KVPOOL_AUTH_TOKEN or the file KVPOOL_AUTH_TOKEN_FILE) when it
    has auth on. Unset → the embedded pool: the owning worker creates and serves it; a scheduler
    or another worker in the same process uses it directly, one in another process reaches it
    through the rendezvous file. A pool that cannot even be opened is a permanent miss, never an
    engine failure."""
    with _shared_lock:
        if url:
            key = (url, timeout_s, token)
            if key not in _shared:
                try:
                    auth = token if token is not None else bearer_token(settings or load_settings(None))
                    _shared[key] = SafePool(UrlPool(url, timeout_s, auth), deadline_s=timeout_s)
                except Exception as exc:
                    _shared[key] = _broken(url, exc)
                atexit.register(_shared[key].close)
            return _shared[key]
        ident = (engine_id, dp_rank)
        if ident in _embedded:
            return _embedded[ident]
        path = rendezvous_path(engine_id, dp_rank)
        if not owner:
            return SafePool(RendezvousPool(path, timeout_s), deadline_s=timeout_s)
        try:
            pool = SafePool(_open_embedded(memory_bytes, disk_dir, disk_bytes, path))
        except Exception as exc:
            pool = _broken("embedded", exc)
        _embedded[ident] = pool
        atexit.register(pool.close)
        return pool


def _open_embedded(memory_bytes: int, disk_dir: str | None, disk_bytes: int, rendezvous: str) -> Pool:
    """The embedded pool, a cache node in this process. This is the one sanctioned import of the
    server side by the connector (pyproject.toml's import contracts name it): made here, lazily,
    so that a vLLM pod's payload, which carries no server modules, never needs it unless no
    KVPOOL_URL is set."""
    try:
        from kvpool.cachenode.server.embedded import LocalNodePool
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("kvpool.cachenode.server"):
            raise
        raise RuntimeError(NO_EMBEDDED_POOL) from exc
    return LocalNodePool(memory_bytes, disk_dir, disk_bytes, rendezvous)


def _broken(what: str, exc: Exception) -> SafePool:
    log.warning("kvpool: could not open pool %s (%s); running without a cache", what, exc)
    metrics.ERRORS.labels(kind=f"open:{type(exc).__name__}").inc()
    return SafePool(None)
