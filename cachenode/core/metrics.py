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

# Pools of several nodes: membership as this node sees it, and chunks handed to new owners.
POOL_MEMBERS = Gauge(
    "kvpool_pool_members", "Members of this node's pool by state, itself included", ["state"]
)
HANDOFF_CHUNKS = Counter(
    "kvpool_handoff_chunks_total",
    "Chunks handed to their new owners after a view change, by reason (leave, rebalance) and result",
    ["reason", "result"],
)
CLIENT_FALLBACK_HITS = Counter(
    "kvpool_client_fallback_hits_total",
    "Keys a client found away from their current owners after those missed (a node joined): at an "
    "owner under an earlier view (via=earlier_view) or the next node in rendezvous order (via=next_node)",
    ["op", "via"],
)
# NIXL (zero-copy) transfers.
NIXL_LEASES = Counter("kvpool_nixl_leases_total", "Leases handed out for NIXL transfers", ["kind"])
NIXL_LEASES_EXPIRED = Counter(
    "kvpool_nixl_leases_expired_total", "NIXL leases that ran out their TTL (peer gone or too slow)", ["kind"]
)
NIXL_BYTES = Counter("kvpool_nixl_bytes_total", "Value bytes moved over NIXL", ["op", "side"])
NIXL_FALLBACKS = Counter(
    "kvpool_client_nixl_fallbacks_total",
    "Client requests that fell back from NIXL to the TCP data channel, by reason",
    ["reason"],
)
# Agents (the vLLM pod's sidecar): the connector's shared-memory arena, peers and the pool behind it.
ARENA_LEASES = Counter(
    "kvpool_agent_arena_leases_total", "Leases on arena ranges handed to the connector in the pod", ["kind"]
)
ARENA_LEASES_EXPIRED = Counter(
    "kvpool_agent_arena_leases_expired_total",
    "Arena leases that ran out their TTL (the connector died or was too slow)",
    ["kind"],
)
AGENT_FETCHED = Counter(
    "kvpool_agent_fetched_chunks_total",
    "Chunks an agent fetched on a local miss, by source (peer agent, pool of cache nodes)",
    ["source"],
)
AGENT_FETCHED_BYTES = Counter(
    "kvpool_agent_fetched_bytes_total", "Value bytes an agent fetched on a local miss, by source", ["source"]
)
AGENT_FETCH_ERRORS = Counter(
    "kvpool_agent_fetch_errors_total",
    "Failed calls of an agent to the lookup service, a peer agent or the pool",
    ["target"],
)
AGENT_WRITE_THROUGH = Counter(
    "kvpool_agent_write_through_total",
    "Chunks an agent queued for the cache nodes, and what became of them",
    ["result"],
)

# The lookup service's holder side (an agent or a node that publishes into the index).
PUBLISHER_EVENTS = Counter("kvpool_lookup_publisher_events_total", "Events this holder had acknowledged")
PUBLISHER_RESYNCS = Counter("kvpool_lookup_publisher_resyncs_total", "Snapshots this holder sent")
PUBLISHER_OVERFLOWS = Counter(
    "kvpool_lookup_publisher_overflows_total",
    "Times more events waited than the publisher keeps (they were replaced by a snapshot)",
)
PUBLISHER_ERRORS = Counter(
    "kvpool_lookup_publisher_errors_total", "Failed calls to the lookup service (retried)"
)
