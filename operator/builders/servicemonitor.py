"""A Prometheus-operator ServiceMonitor for the nodes' `/metrics` (only where that CRD exists)."""

from __future__ import annotations

from typing import Any

from .. import naming
from ..settings import PoolSettings
from .common import CA_KEY, METRICS_LABEL, NODE_COMPONENT, SERVICE_MONITOR_API_VERSION, headless_dns


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    meta = naming.metadata(owner, naming.statefulset_name(s.name), NODE_COMPONENT)
    meta["labels"].update(s.service_monitor_labels)
    endpoint: dict[str, Any] = {"port": "http", "path": "/metrics", "interval": s.service_monitor_interval}
    if s.tls_secret:
        endpoint["scheme"] = "https"
        # Prometheus dials pod IPs: verify the certificate against the headless Service's name,
        # which the pool's certificate carries (common.tls_dns_names).
        endpoint["tlsConfig"] = {
            "insecureSkipVerify": False,
            "ca": {"secret": {"name": s.tls_secret, "key": CA_KEY}},
            "serverName": headless_dns(s),
        }
    if s.auth_token:
        endpoint["authorization"] = {
            "type": "Bearer",
            "credentials": {"name": s.auth_token.name, "key": s.auth_token.key},
        }
    return {
        "apiVersion": SERVICE_MONITOR_API_VERSION,
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {**naming.selector(s.name, NODE_COMPONENT), **METRICS_LABEL}},
            "namespaceSelector": {"matchNames": [s.namespace]},
            "endpoints": [endpoint],
        },
    }
