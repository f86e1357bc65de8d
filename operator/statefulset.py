"""The cache-node StatefulSet: stable identities for rendezvous placement, a disk per node."""

from __future__ import annotations

from typing import Any

from . import naming, sizing
from .configmap import DISK_DIR, NODE_DATA_PORT, NODE_HTTP_PORT, NODE_PORT, config_hash
from .settings import PoolSettings, SecretKey

COMPONENT = "cache-node"
AUTH_DIR = "/etc/kvpool/auth"
TLS_DIR = "/etc/kvpool/tls"


def _secret_env(name: str, ref: SecretKey | None) -> list[dict[str, Any]]:
    if ref is None:
        return []
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def restricted_security_context() -> dict[str, Any]:
    """The Pod Security Standard `restricted` profile, container part."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def probes(port: str, tls: bool) -> dict[str, Any]:
    """Readiness follows `/readyz` (a node that is still loading its disk index takes no traffic)."""
    scheme = "HTTPS" if tls else "HTTP"
    return {
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": port, "scheme": scheme},
            "periodSeconds": 5,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": port, "scheme": scheme},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": port, "scheme": scheme},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
    }


def _env(s: PoolSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KVPOOL_NODE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KVPOOL_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    env += _secret_env("KVPOOL_REDIS_USERNAME", s.redis_username)
    env += _secret_env("KVPOOL_REDIS_PASSWORD", s.redis_password)
    env += _secret_env("AWS_ACCESS_KEY_ID", s.s3_access_key)
    env += _secret_env("AWS_SECRET_ACCESS_KEY", s.s3_secret_key)
    if s.auth_token:
        env.append({"name": "KVPOOL_AUTH_TOKEN_FILE", "value": f"{AUTH_DIR}/{s.auth_token.key}"})
    if s.tls_secret:
        env += [
            {"name": "KVPOOL_TLS_CERT_FILE", "value": f"{TLS_DIR}/tls.crt"},
            {"name": "KVPOOL_TLS_KEY_FILE", "value": f"{TLS_DIR}/tls.key"},
        ]
    return env


def _volumes(s: PoolSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if s.disk_size:
        mounts.append({"name": "data", "mountPath": DISK_DIR})
    if s.auth_token:
        volumes.append({"name": "auth", "secret": {"secretName": s.auth_token.name, "defaultMode": 0o400}})
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
    if s.tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": s.tls_secret, "defaultMode": 0o400}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return volumes, mounts


def pod_scheduling(s: PoolSettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.node_selector:
        out["nodeSelector"] = s.node_selector
    if s.tolerations:
        out["tolerations"] = s.tolerations
    if s.affinity:
        out["affinity"] = s.affinity
    if s.priority_class:
        out["priorityClassName"] = s.priority_class
    if s.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    return out


def resources(s: PoolSettings) -> dict[str, Any]:
    """Memory request = limit = cache + overhead, so neither the kernel nor eviction kills the node."""
    memory = sizing.quantity(s.container_memory)
    out: dict[str, Any] = {"requests": {"memory": memory}, "limits": {"memory": memory}}
    if s.cpu_request:
        out["requests"]["cpu"] = s.cpu_request
    if s.cpu_limit:
        out["limits"]["cpu"] = s.cpu_limit
    return out


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    volumes, mounts = _volumes(s)
    labels = naming.labels(s.name, COMPONENT, s.image.rsplit(":", 1)[-1] if ":" in s.image else None)
    container = {
        "name": "node",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["kvpool", "node"],
        "args": [
            "--port",
            str(NODE_PORT),
            "--http-port",
            str(NODE_HTTP_PORT),
            "--data-port",
            str(NODE_DATA_PORT),
        ],
        "envFrom": [{"configMapRef": {"name": naming.configmap_name(s.name)}}],
        "env": _env(s),
        "ports": [
            {"name": "grpc", "containerPort": NODE_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": NODE_HTTP_PORT, "protocol": "TCP"},
            {"name": "data", "containerPort": NODE_DATA_PORT, "protocol": "TCP"},
        ],
        "resources": resources(s),
        "volumeMounts": mounts,
        "securityContext": restricted_security_context(),
        **probes("http", bool(s.tls_secret)),
    }
    spec: dict[str, Any] = {
        "replicas": s.replicas,
        "serviceName": naming.headless_service_name(s.name),
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
        "selector": {"matchLabels": naming.selector(s.name, COMPONENT)},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": s.disk_reclaim, "whenScaled": "Retain"},
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {"kvpool.io/config-hash": config_hash(s)},
            },
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 30,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [container],
                "volumes": volumes,
                **pod_scheduling(s),
            },
        },
    }  # fmt: skip
    if s.disk_size:
        claim: dict[str, Any] = {
            "metadata": {"name": "data", "labels": naming.selector(s.name, COMPONENT)},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": s.disk_size}}},
        }
        if s.storage_class:
            claim["spec"]["storageClassName"] = s.storage_class
        spec["volumeClaimTemplates"] = [claim]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": naming.metadata(owner, naming.statefulset_name(s.name), COMPONENT),
        "spec": spec,
    }


def _claims(sts: dict[str, Any]) -> list[tuple[Any, Any]]:
    return [
        ((c.get("spec") or {}).get("resources", {}).get("requests", {}).get("storage"),
         (c.get("spec") or {}).get("storageClassName"))
        for c in (sts.get("spec") or {}).get("volumeClaimTemplates") or []
    ]  # fmt: skip


def immutable_change(current: dict[str, Any] | None, desired: dict[str, Any]) -> str | None:
    """Why `desired` cannot be applied over `current` (the API server refuses volume-claim changes)."""
    if current is None:
        return None
    old, new = _claims(current), _claims(desired)
    if len(old) != len(new) or any(
        o[0] != n[0] or (n[1] and o[1] != n[1]) for o, n in zip(old, new, strict=True)
    ):
        return (
            f"spec.disk cannot change after the pool is created (StatefulSet volume claims are immutable): "
            f"running with {old or 'no disk'}, spec asks for {new or 'no disk'}; create a new pool instead"
        )
    return None
