"""A NetworkPolicy that admits only the pool itself and the chosen clients to the pool's ports."""

from __future__ import annotations

from typing import Any

from . import naming
from .configmap import LOOKUP_HTTP_PORT, LOOKUP_PORT, NODE_DATA_PORT, NODE_HTTP_PORT, NODE_PORT
from .settings import PoolSettings


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    clients: dict[str, Any] = {"podSelector": s.client_pod_selector}
    if s.client_namespace_selector is not None:
        clients["namespaceSelector"] = s.client_namespace_selector
    pool_pods = {
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/instance": s.name, "app.kubernetes.io/name": "kvpool"}
        }
    }
    ports = [
        {"protocol": "TCP", "port": p}
        for p in (NODE_PORT, NODE_HTTP_PORT, NODE_DATA_PORT, LOOKUP_PORT, LOOKUP_HTTP_PORT)
    ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": naming.metadata(owner, naming.statefulset_name(s.name), "network-policy"),
        "spec": {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/instance": s.name, "app.kubernetes.io/name": "kvpool"}
            },
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [pool_pods, clients], "ports": ports}],
        },
    }
