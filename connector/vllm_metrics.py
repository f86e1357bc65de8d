"""vLLM-facing stats and Prometheus classes for the connector (see metrics.py for why)."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from . import metrics, miss_reasons

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class KVPoolConnectorStats(KVConnectorStats):
    """``data`` is a ``metrics.ConnectorStats.take()`` payload (plain dicts/lists: serialisable)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data = metrics.merge(self.data or {}, other.data or {})
        return self

    def reduce(self) -> dict[str, int | float]:
        counts = dict(self.data.get("counts", {}))
        out: dict[str, int | float] = {k: counts.get(k, 0) for k in metrics.COUNTERS}
        req = out["requested_tokens"]
        out["hit_ratio"] = round(out["hit_tokens"] / req, 4) if req else 0.0
        for name, values in self.data.get("latencies", {}).items():
            if values:
                out[f"avg_{name[:-8]}_ms"] = round(1000 * sum(values) / len(values), 3)
        out["errors"] = sum(self.data.get("errors", {}).values())
        out["miss_tokens"] = sum(self.data.get("misses", {}).values())
        return out

    def is_empty(self) -> bool:
        d = self.data or {}
        return not (
            d.get("counts") or d.get("errors") or d.get("misses") or any(d.get("latencies", {}).values())
        )


class KVPoolPromMetrics(KVConnectorPromMetrics):
    """Registers ``kvpool_connector_*`` series in the API server's registry (so /metrics has them)."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(
                name=f"kvpool_connector_{name}",
                documentation=f"kvpool connector: {name}",
                labelnames=labelnames,
            )
            for name in metrics.COUNTERS
        }
        self._errors = self._counter_cls(
            name="kvpool_connector_errors",
            documentation="kvpool connector errors by kind (every one became a cache miss)",
            labelnames=[*labelnames, "kind"],
        )
        self._misses = self._counter_cls(
            name="kvpool_connector_miss_tokens",
            documentation="kvpool connector: prompt tokens not loaded from the pool, by reason "
            "(docs/connector.md, 'Why a request missed')",
            labelnames=[*labelnames, "reason", "detail"],
        )
        self._hist = {
            name: self._histogram_cls(
                name=f"kvpool_connector_{name}",
                documentation=f"kvpool connector {name[:-8]} latency",
                labelnames=labelnames,
                buckets=_BUCKETS,
            )
            for name in metrics.LATENCIES
        }
        # make every series visible at 0 from the start, not only after the first event
        for labels in per_engine_labelvalues.values():
            for c in self._counters.values():
                c.labels(*labels)
            for reason, detail in miss_reasons.all_labels():
                self._misses.labels(*labels, reason, detail)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, n in transfer_stats_data.get("counts", {}).items():
            if name in self._counters and n:
                self._counters[name].labels(*labels).inc(n)
        for kind, n in transfer_stats_data.get("errors", {}).items():
            self._errors.labels(*labels, kind).inc(n)
        for key, n in transfer_stats_data.get("misses", {}).items():
            if n:
                self._misses.labels(*labels, *miss_reasons.split_label(key)).inc(n)
        for name, values in transfer_stats_data.get("latencies", {}).items():
            if name in self._hist:
                for v in values:
                    self._hist[name].labels(*labels).observe(v)


def take_stats() -> KVPoolConnectorStats | None:
    """This process's connector stats since the last call, for vLLM's stats path (None: nothing)."""
    data = metrics.STATS.take()
    return KVPoolConnectorStats(data=data) if data else None
