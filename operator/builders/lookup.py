"""The lookup service's Deployment: the P2P index of which agent or node holds which chunk.

One replica (the index lives in one process), replaced with Recreate so two never answer at once;
ready (/readyz) only once holders have resynced after a start, so a rolling restart never routes
lookups to an empty index. Its template carries no config hash: it reads nothing from the ConfigMap
(everything it reads is in the template itself), so memory or tier changes never restart the index.
"""

from __future__ import annotations

from typing import Any

from .. import naming
from ..settings import PoolSettings
from .common import (
    LOOKUP_COMPONENT,
    LOOKUP_HTTP_PORT,
    LOOKUP_PORT,
    LOOKUP_PORTS,
    LOOKUP_QUERY_PORT,
    container_ports,
    pod_metadata,
    pod_security_context,
    probes,
    restricted_security_context,
    scheduling,
    security_mounts,
    tmp_volume,
)

TMP_SIZE = "64Mi"
"""The lookup keeps its index in memory; /tmp is only for the odd library temp file."""


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    extra_volumes, extra_mounts, env = security_mounts(s)
    container: dict[str, Any] = {
        "name": "lookup",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["kvpool", "lookup"],
        "args": [
            *("--port", str(LOOKUP_PORT), "--http-port", str(LOOKUP_HTTP_PORT)),
            *("--query-port", str(LOOKUP_QUERY_PORT)),
        ],
        "ports": container_ports(LOOKUP_PORTS),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *extra_mounts],
        "securityContext": restricted_security_context(),
        **probes("http", bool(s.tls_secret)),
    }
    if env:
        container["env"] = env
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": naming.metadata(owner, naming.lookup_name(s.name), LOOKUP_COMPONENT),
        "spec": {
            "replicas": s.lookup_replicas,
            "selector": {"matchLabels": naming.selector(s.name, LOOKUP_COMPONENT)},
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": pod_metadata(s, LOOKUP_COMPONENT, {}),
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": pod_security_context(),
                    "containers": [container],
                    "volumes": [tmp_volume(TMP_SIZE), *extra_volumes],
                    **scheduling(s, LOOKUP_COMPONENT),
                },
            },
        },
    }
