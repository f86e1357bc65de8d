"""The operator's own metrics: reconciles by handler and outcome, and how long they take.

In the process-wide Prometheus registry, which `kvpool operator --metrics-port` serves at /metrics
(beside the webhook's metrics when the webhook runs).

handler: `create`, `update`, `resume` (the change handlers, by kopf's reason) or `pass` (the status
and repair pass every KVPOOL_STATUS_INTERVAL). outcome: `applied` (children written), `unchanged`,
`repaired` (a pass put back drifted children), `invalid` (ConfigValid=False), `refused` (the API
server refused a child), `skipped` (a pass left the pool to a change handler in flight), `gone` (a
pass found its pool deleted), `error` (an exception; kopf or the next pass retries).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "kvpool_operator_reconciles", "Reconciles of KVCachePools by handler and outcome", ["handler", "outcome"]
)
RECONCILE_SECONDS = Histogram(
    "kvpool_operator_reconcile_seconds",
    "Time one reconcile of a KVCachePool took, by handler (a pass includes reading the nodes' stats)",
    ["handler"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OUTCOMES = ("applied", "unchanged", "repaired", "invalid", "refused", "skipped", "gone", "error")


class Outcome:
    """What a reconcile came to; the handler sets `value` before it returns (or raises on purpose,
    as on a refused child; any other exception counts as `error`)."""

    def __init__(self) -> None:
        self.value: str | None = None


@contextmanager
def reconciling(handler: str) -> Iterator[Outcome]:
    """Count and time one reconcile; an exception counts as `error` (and propagates)."""
    outcome = Outcome()
    started = time.monotonic()
    try:
        yield outcome
    except BaseException:
        outcome.value = outcome.value or "error"
        raise
    finally:
        RECONCILES.labels(handler, outcome.value or "unchanged").inc()
        RECONCILE_SECONDS.labels(handler).observe(time.monotonic() - started)
