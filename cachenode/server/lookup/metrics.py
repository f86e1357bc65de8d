"""Prometheus metrics of the lookup service (module level: one set per process)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("kvpool_lookup_requests_total", "Lookup service calls", ["op"])
LATENCY = Histogram(
    "kvpool_lookup_request_seconds", "Lookup service call latency", ["op"], buckets=_LATENCY_BUCKETS
)
QUERY_KEYS = Counter("kvpool_lookup_query_keys_total", "Keys asked for by Locate and Scores")
PREFIX_KEYS = Counter("kvpool_lookup_prefix_keys_total", "Keys of the held prefixes Locate and Scores found")
EVENTS = Counter("kvpool_lookup_events_total", "Admit/evict events applied", ["op"])
BATCHES = Counter("kvpool_lookup_batches_total", "Event batches by outcome", ["result"])
RESYNCS = Counter("kvpool_lookup_resyncs_total", "Snapshots applied")
RESYNC_REQUESTS = Counter(
    "kvpool_lookup_resync_requests_total", "Times a holder was told to resync, by reason", ["reason"]
)
DROPPED_ENTRIES = Counter(
    "kvpool_lookup_dropped_entries_total",
    "Entries removed because their holder's lease ran out, it restarted, or its snapshot lacked them",
    ["reason"],
)
EXPIRED_HOLDERS = Counter(
    "kvpool_lookup_expired_holders_total", "Holders dropped because they stopped heartbeating"
)
EVENT_LAG = Histogram(
    "kvpool_lookup_event_lag_seconds",
    "Age of the oldest event of a batch when its holder sent it",
    buckets=_LAG_BUCKETS,
)
HOLDERS = Gauge("kvpool_lookup_holders", "Holders publishing into the index", ["kind"])
KEYS = Gauge("kvpool_lookup_keys", "Distinct chunk keys in the index")
ENTRIES = Gauge("kvpool_lookup_entries", "(key, holder) entries in the index")
INDEX_BYTES = Gauge("kvpool_lookup_index_bytes", "Bytes held by the index's table")
AUTHORITATIVE = Gauge(
    "kvpool_lookup_authoritative", "1 once the index was rebuilt after start (answers are complete)"
)
ERRORS = Counter("kvpool_lookup_errors_total", "Rejected calls by kind", ["kind"])

_QUERY_REQUESTS = {op: REQUESTS.labels(op) for op in ("locate", "scores")}
_QUERY_LATENCY = {op: LATENCY.labels(op) for op in ("locate", "scores")}


def query_done(op: str, started: float, keys: int, prefix: int) -> None:
    """Count one answered Locate/Scores (gRPC or the query channel alike)."""
    _QUERY_REQUESTS[op].inc()
    QUERY_KEYS.inc(keys)
    PREFIX_KEYS.inc(prefix)
    _QUERY_LATENCY[op].observe(time.perf_counter() - started)
