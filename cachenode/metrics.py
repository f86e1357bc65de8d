"""Prometheus metrics of the cache node, defined once per process (module level).

Labels instead of per-instance metrics: an embedded pool and a node may share one process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

REQUESTS = Counter("kvpool_node_requests_total", "Requests served by the node", ["op", "transport"])
REQUESTED_KEYS = Counter("kvpool_node_requested_keys_total", "Keys asked for by get/get_many/prefix_hits")
HIT_KEYS = Counter("kvpool_node_hit_keys_total", "Keys found by get/get_many/prefix_hits")
BYTES_IN = Counter("kvpool_node_bytes_in_total", "Value bytes received by puts", ["transport"])
BYTES_OUT = Counter("kvpool_node_bytes_out_total", "Value bytes sent by gets", ["transport"])
LATENCY = Histogram(
    "kvpool_node_request_seconds", "Node-side request latency", ["op"], buckets=_LATENCY_BUCKETS
)
ERRORS = Counter("kvpool_node_errors_total", "Errors by kind", ["kind"])

TIER_HITS = Counter("kvpool_tier_hits_total", "Lookups answered by a tier", ["tier"])
TIER_MISSES = Counter("kvpool_tier_misses_total", "Lookups a tier could not answer", ["tier"])
TIER_CAPACITY = Gauge("kvpool_tier_capacity_bytes", "Byte budget of a tier", ["tier"])
TIER_USAGE = Gauge("kvpool_tier_usage_bytes", "Bytes held by a tier", ["tier"])
TIER_ENTRIES = Gauge("kvpool_tier_entries", "Records held by a tier", ["tier"])
TIER_EVICTIONS = Counter("kvpool_tier_evictions_total", "Records evicted to stay in budget", ["tier"])
TIER_CORRUPT = Counter(
    "kvpool_tier_corrupt_records_total", "Records that failed verification and were removed", ["tier"]
)
TIER_WRITE_SECONDS = Histogram(
    "kvpool_tier_write_seconds", "Time to write one record to a tier", ["tier"], buckets=_LATENCY_BUCKETS
)
TIER_READ_SECONDS = Histogram(
    "kvpool_tier_read_seconds", "Time to read one record from a tier", ["tier"], buckets=_LATENCY_BUCKETS
)
TIER_DEGRADED = Gauge("kvpool_tier_degraded", "1 while a tier is failing and skipped", ["tier"])
TIER_QUEUE_DEPTH = Gauge("kvpool_tier_queue_depth", "Records waiting for background write", ["tier"])
TIER_DROPPED_WRITES = Counter(
    "kvpool_tier_dropped_writes_total", "Background writes dropped (queue full or tier failing)", ["tier"]
)
PINNED_BYTES = Gauge("kvpool_pinned_bytes", "Bytes pinned by leases for zero-copy reads")
INDEX_REBUILD_SECONDS = Gauge("kvpool_disk_index_rebuild_seconds", "Time the last disk index rebuild took")

# Shared tiers (Redis/Valkey, S3): traffic, errors and breaker state per tier.
TIER_BYTES_READ = Counter("kvpool_tier_read_bytes_total", "Record bytes read from a tier", ["tier"])
TIER_BYTES_WRITTEN = Counter("kvpool_tier_written_bytes_total", "Record bytes written to a tier", ["tier"])
TIER_ERRORS = Counter("kvpool_tier_errors_total", "Failed calls to a tier by kind", ["tier", "kind"])
TIER_SKIPPED = Counter(
    "kvpool_tier_skipped_total",
    "Calls not sent to a tier because its circuit breaker was open",
    ["tier", "op"],
)
TIER_BREAKER_STATE = Gauge(
    "kvpool_tier_breaker_state", "Circuit breaker of a tier: 0 closed, 1 half-open, 2 open", ["tier"]
)
