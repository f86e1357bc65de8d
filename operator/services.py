"""The pool's Services: headless for node identities, a client Service, and the lookup Service."""

from __future__ import annotations

from typing import Any

from . import naming
from .configmap import LOOKUP_HTTP_PORT, LOOKUP_PORT, NODE_DATA_PORT, NODE_HTTP_PORT, NODE_PORT
from .settings import PoolSettings

NODE_COMPONENT = "cache-node"
LOOKUP_COMPONENT = "lookup"


def _ports(*named: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in named]


_NODE_PORTS = (("grpc", NODE_PORT), ("http", NODE_HTTP_PORT), ("data", NODE_DATA_PORT))


def headless(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    """Per-node DNS names (`<pool>-N.<pool>-nodes`); published before ready so peers find each other."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.metadata(owner, naming.headless_service_name(s.name), NODE_COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": naming.selector(s.name, NODE_COMPONENT),
            "ports": _ports(*_NODE_PORTS),
        },
    }


def client(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    """The address clients use (`KVPOOL_URL`); only ready nodes receive traffic."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.metadata(owner, naming.client_service_name(s.name), NODE_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector(s.name, NODE_COMPONENT),
            "ports": _ports(*_NODE_PORTS),
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
            "ports": _ports(("grpc", LOOKUP_PORT), ("http", LOOKUP_HTTP_PORT)),
        },
    }
