"""A NetworkPolicy that admits only the pool itself and the chosen clients to the pool's ports,
and, with a ServiceMonitor, Prometheus (from `spec.networkPolicy.metricsNamespaceSelector`) to the
nodes' HTTP port only. Probes need no rule: the kubelet's own traffic is never blocked."""

from __future__ import annotations

from typing import Any

from .. import naming
from ..settings import PoolSettings
from .common import LOOKUP_PORTS, NODE_HTTP_PORT, NODE_PORTS


def metrics_rule(s: PoolSettings) -> dict[str, Any]:
    """Scrapers in the metrics namespaces may reach `/metrics` (HTTP port), nothing else."""
    return {
        "from": [{"namespaceSelector": s.metrics_namespace_selector}],
        "ports": [{"protocol": "TCP", "port": NODE_HTTP_PORT}],
    }


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    clients: dict[str, Any] = {"podSelector": s.client_pod_selector}
    if s.client_namespace_selector is not None:
        clients["namespaceSelector"] = s.client_namespace_selector
    pool_pods = {"matchLabels": {"app.kubernetes.io/instance": s.name, "app.kubernetes.io/name": "kvpool"}}
    named = NODE_PORTS + (LOOKUP_PORTS if s.lookup_replicas else ())
    ingress: list[dict[str, Any]] = [
        {
            "from": [{"podSelector": pool_pods}, clients],
            "ports": [{"protocol": "TCP", "port": p} for _, p in named],
        }
    ]
    if s.service_monitor:
        ingress.append(metrics_rule(s))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": naming.metadata(owner, naming.statefulset_name(s.name), "network-policy"),
        "spec": {"podSelector": pool_pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }
