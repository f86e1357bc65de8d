"""The lookup service's Deployment: the P2P index of which agent or node holds which chunk."""

from __future__ import annotations

from typing import Any

from . import naming
from .configmap import LOOKUP_HTTP_PORT, LOOKUP_PORT, config_hash
from .settings import PoolSettings
from .statefulset import AUTH_DIR, TLS_DIR, pod_scheduling, probes, restricted_security_context

COMPONENT = "lookup"


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    env: list[dict[str, Any]] = []
    if s.auth_token:
        volumes.append({"name": "auth", "secret": {"secretName": s.auth_token.name, "defaultMode": 0o400}})
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
        env.append({"name": "KVPOOL_AUTH_TOKEN_FILE", "value": f"{AUTH_DIR}/{s.auth_token.key}"})
    if s.tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": s.tls_secret, "defaultMode": 0o400}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        env += [
            {"name": "KVPOOL_TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"},
            {"name": "KVPOOL_TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"},
        ]
    container: dict[str, Any] = {
        "name": "lookup",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["kvpool", "lookup"],
        "args": ["--port", str(LOOKUP_PORT), "--http-port", str(LOOKUP_HTTP_PORT)],
        "envFrom": [{"configMapRef": {"name": naming.configmap_name(s.name)}}],
        "ports": [
            {"name": "grpc", "containerPort": LOOKUP_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": LOOKUP_HTTP_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": mounts,
        "securityContext": restricted_security_context(),
        **probes("http", bool(s.tls_secret)),
    }
    if env:
        container["env"] = env
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": naming.metadata(owner, naming.lookup_name(s.name), COMPONENT),
        "spec": {
            "replicas": s.lookup_replicas,
            "selector": {"matchLabels": naming.selector(s.name, COMPONENT)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": naming.labels(s.name, COMPONENT),
                    "annotations": {"kvpool.io/config-hash": config_hash(s)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [container],
                    "volumes": volumes,
                    **pod_scheduling(s),
                },
            },
        },
    }  # fmt: skip
