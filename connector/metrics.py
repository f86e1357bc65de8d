"""Connector counters, shipped the way vLLM wants them so that ``vllm serve``'s /metrics shows them.

The connector runs inside vLLM's engine-core and worker processes, but /metrics is served by the
API-server process; a plain prometheus_client counter in the engine would never appear there.
vLLM's route is: the connector returns a ``KVConnectorStats`` from ``get_kv_connector_stats()``
(scheduler and worker side alike), vLLM ships and aggregates it, and the API server feeds it to the
``KVConnectorPromMetrics`` that the connector class builds. This module holds the process-local
accumulator (pure Python, no vLLM import); ``vllm_metrics`` holds the vLLM-facing classes.
"""

from __future__ import annotations

import threading
from collections import Counter as _Counter
from typing import Any

COUNTERS = (
    "requests",  # requests looked up
    "requested_tokens",  # prompt tokens of those requests
    "hit_tokens",  # tokens the pool offered (full chunks, at least one token left to compute)
    "loaded_tokens",  # tokens actually loaded into the engine
    "load_failed_tokens",  # tokens whose load failed (recomputed by vLLM)
    "stored_tokens",  # tokens written to the pool
    "corrupt_chunks",  # chunks rejected by header/fingerprint/checksum checks
    "refused_requests",  # requests the connector cannot key safely: neither loaded nor stored
    "unsaved_tokens",  # tokens computed over a failed load (on any rank): not stored
    "lookups",  # lookups sent to the pool (answers that load nothing are reused for a while)
    "lookup_skipped_steps",  # times vLLM was told "not known yet": a request waited a step
    "pd_wait_steps",  # steps a request waited for chunks its prefill engine was storing
    "pd_wait_timeouts",  # requests that waited out announced_wait_ms and computed the rest
)
LATENCIES = ("lookup_seconds", "load_seconds", "store_seconds", "lookup_wait_seconds")


class _Kind:
    def __init__(self, stats: ConnectorStats, kind: str) -> None:
        self._stats, self._kind = stats, kind

    def inc(self, n: int = 1) -> None:
        self._stats.add_error(self._kind, n)


class _Errors:
    """``ERRORS.labels(kind=...).inc()``: the prometheus_client idiom, on the accumulator."""

    def __init__(self, stats: ConnectorStats) -> None:
        self._stats = stats

    def labels(self, kind: str) -> _Kind:
        return _Kind(self._stats, kind)


class ConnectorStats:
    """Thread-safe interval accumulator; ``take()`` returns the interval's data and resets it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()
        self.totals: _Counter[str] = _Counter()  # never reset: for tests and `kvpool bench`

    def _reset(self) -> None:
        self._counts: _Counter[str] = _Counter()
        self._latencies: dict[str, list[float]] = {k: [] for k in LATENCIES}
        self._errors: _Counter[str] = _Counter()
        self._misses: _Counter[str] = _Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
            self.totals[name] += n

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._latencies[name].append(seconds)

    def add_error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._errors[kind] += n
            self.totals["errors"] += n

    def add_misses(self, misses: dict[str, int]) -> None:
        """Prompt tokens not loaded, by ``miss_reasons.label`` (``reason`` or ``reason:detail``)."""
        with self._lock:
            for key, n in misses.items():
                if n > 0:
                    self._misses[key] += n
                    self.totals[f"miss:{key}"] += n

    def take(self) -> dict[str, Any] | None:
        with self._lock:
            if not (self._counts or self._errors or self._misses or any(self._latencies.values())):
                return None
            data = {
                "counts": dict(self._counts),
                "latencies": {k: list(v) for k, v in self._latencies.items()},
                "errors": dict(self._errors),
                "misses": dict(self._misses),
            }
            self._reset()
            return data


STATS = ConnectorStats()
ERRORS = _Errors(STATS)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum two ``take()`` payloads (how vLLM aggregates workers and steps)."""
    counts = _Counter(a.get("counts", {}))
    counts.update(b.get("counts", {}))
    errors = _Counter(a.get("errors", {}))
    errors.update(b.get("errors", {}))
    misses = _Counter(a.get("misses", {}))
    misses.update(b.get("misses", {}))
    lat = {
        k: list(a.get("latencies", {}).get(k, [])) + list(b.get("latencies", {}).get(k, []))
        for k in LATENCIES
    }
    return {"counts": dict(counts), "latencies": lat, "errors": dict(errors), "misses": dict(misses)}
