"""The pool's Services: headless for node identities, a client Service, and the lookup Service."""

from __future__ import annotations

from typing import Any

from .. import naming
from ..settings import PoolSettings
from .common import LOOKUP_COMPONENT, LOOKUP_PORTS, METRICS_LABEL, NODE_COMPONENT, NODE_PORTS, service_ports


def headless(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    """Per-node DNS names (`<pool>-N.<pool>-nodes`), and one name for all (the nodes' `--peers`);
    published before ready so that starting nodes find each other. The ServiceMonitor scrapes
    through this Service only (`METRICS_LABEL`), so no node is scraped twice."""
    meta = naming.metadata(owner, naming.headless_service_name(s.name), NODE_COMPONENT)
    meta["labels"].update(METRICS_LABEL)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": naming.selector(s.name, NODE_COMPONENT),
            "ports": service_ports(NODE_PORTS),
        },
    }


def client(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    """The address clients start from (`KVPOOL_URL`); only ready nodes receive traffic. Its type and
    annotations come from spec.service (e.g. an internal load balancer for clients outside the cluster)."""
    meta = naming.metadata(owner, naming.client_service_name(s.name), NODE_COMPONENT)
    if s.service_annotations:
        meta["annotations"] = dict(s.service_annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": s.service_type,
            "selector": naming.selector(s.name, NODE_COMPONENT),
            "ports": service_ports(NODE_PORTS),
        },
    }


def lookup(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.metadata(owner, naming.lookup_name(s.name), LOOKUP_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector(s.name, LOOKUP_COMPONENT),
            "ports": service_ports(LOOKUP_PORTS),
            # Holders must reach a restarted lookup service to resync: that is what makes it ready.
            "publishNotReadyAddresses": True,
        },
    }
