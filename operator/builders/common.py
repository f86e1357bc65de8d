"""The parts every child builder shares, so that no builder imports another.

Component names, ports (the node's from the settings registry), where Secrets are mounted, the
pod and container security contexts, probes, the auth/TLS volumes and env, scheduling, the config
hash stamped on pod templates, and the addresses clients use. Pure: dicts in, dicts out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvpool.cachenode.core import settings as registry

from .. import naming
from ..settings import PoolSettings, SecretKey

NODE_COMPONENT = "cache-node"
LOOKUP_COMPONENT = "lookup"

NODE_PORT = registry.default("port")
NODE_HTTP_PORT = registry.default("http_port")
NODE_DATA_PORT = registry.default("data_port")
NODE_PORTS = (("grpc", NODE_PORT), ("http", NODE_HTTP_PORT), ("data", NODE_DATA_PORT))
LOOKUP_PORT, LOOKUP_HTTP_PORT = 7410, 7411  # DESIGN.md §1 (kvpool lookup)
LOOKUP_QUERY_PORT = 7412
"""The lookup service's lean query channel (`--query-port`), which clients learn from its Hello
and dial at the Service's address: fixed here so the Service and NetworkPolicy can carry it."""
LOOKUP_PORTS = (("grpc", LOOKUP_PORT), ("http", LOOKUP_HTTP_PORT), ("query", LOOKUP_QUERY_PORT))

SERVICE_MONITOR_API_VERSION = "monitoring.coreos.com/v1"
METRICS_LABEL = {"kvpool.io/metrics": "true"}
"""On the one Service a ServiceMonitor scrapes (the headless one: every node once, ready or not)."""
CONFIG_HASH = "kvpool.io/config-hash"

DISK_DIR = "/var/lib/kvpool"
AUTH_DIR = "/etc/kvpool/auth"
TLS_DIR = "/etc/kvpool/tls"
CA_KEY = "ca.crt"
"""The CA's key in the pool's TLS Secret (cert-manager writes it there); clients verify with it."""

RUN_AS = 10001
SECRET_MODE = 0o440
"""Secret files: owner root, group = the pod's fsGroup (RUN_AS); the group bits are what let us read."""


def env(setting: str) -> str:
    """The env var of a registry setting (`KVPOOL_<NAME>`): the one place builders get names from."""
    return registry.SETTINGS[setting].env


def flag(setting: str) -> str:
    return registry.SETTINGS[setting].flag


def env_values(values: dict[str, Any]) -> dict[str, str]:
    """Registry settings → `KVPOOL_*` env text, formatted as the node parses it."""
    return {registry.SETTINGS[name].env: registry.SETTINGS[name].text(v) for name, v in values.items()}


def config_hash(data: dict[str, str]) -> str:
    """A digest of a ConfigMap's data, stamped on pod templates so that a settings change rolls the pods."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def restricted_security_context() -> dict[str, Any]:
    """The Pod Security Standard `restricted` profile, container part."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """Non-root, with `fsGroup`: the kubelet then gives Secret files (token, tls.key) and the node's
    disk to our group, so uid 10001 can read them (without it Secret files are root's, mode 0440 or
    not). `OnRootMismatch` skips the recursive chown of a large disk volume on every start."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def tmp_volume(size_limit: str) -> dict[str, Any]:
    """The writable /tmp under a read-only root, capped: a runaway writer gets its pod evicted
    instead of filling the machine's disk."""
    return {"name": "tmp", "emptyDir": {"sizeLimit": size_limit}}


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


def container_ports(named: tuple[tuple[str, int], ...]) -> list[dict[str, Any]]:
    return [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in named]


def service_ports(named: tuple[tuple[str, int], ...]) -> list[dict[str, Any]]:
    return [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in named]


def secret_env(name: str, ref: SecretKey | None) -> list[dict[str, Any]]:
    if ref is None:
        return []
    return [{"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def security_mounts(
    s: PoolSettings,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts, env) that give a server the pool's token and TLS certificate."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    out_env: list[dict[str, Any]] = []
    if s.auth_token:
        volumes.append(
            {"name": "auth", "secret": {"secretName": s.auth_token.name, "defaultMode": SECRET_MODE}}
        )
        mounts.append({"name": "auth", "mountPath": AUTH_DIR, "readOnly": True})
        out_env.append({"name": env("auth_token_file"), "value": f"{AUTH_DIR}/{s.auth_token.key}"})
    if s.tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": s.tls_secret, "defaultMode": SECRET_MODE}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        out_env += [
            {"name": env("tls_cert_file"), "value": f"{TLS_DIR}/tls.crt"},
            {"name": env("tls_key_file"), "value": f"{TLS_DIR}/tls.key"},
        ]
    return volumes, mounts, out_env


def default_anti_affinity(s: PoolSettings, component: str) -> dict[str, Any]:
    """Spread a component's pods over nodes when the spec says nothing: losing one machine then
    loses one cache node's chunks, not several (preferred, so small clusters still schedule)."""
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": naming.selector(s.name, component)},
                    },
                }
            ]
        }
    }


def pod_metadata(
    s: PoolSettings, component: str, annotations: dict[str, str], version: str | None = None
) -> dict[str, Any]:
    """A pod template's metadata: the spec's pod labels and annotations under the operator's own."""
    return {
        "labels": {**s.pod_labels, **naming.labels(s.name, component, version)},
        "annotations": {**s.pod_annotations, **annotations},
    }


def scheduling(s: PoolSettings, component: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.node_selector:
        out["nodeSelector"] = s.node_selector
    if s.tolerations:
        out["tolerations"] = s.tolerations
    out["affinity"] = s.affinity or default_anti_affinity(s, component)
    if s.topology_spread:
        out["topologySpreadConstraints"] = s.topology_spread
    if s.priority_class:
        out["priorityClassName"] = s.priority_class
    if s.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    return out


def config_map_source(s: PoolSettings) -> list[dict[str, Any]]:
    return [{"configMapRef": {"name": naming.configmap_name(s.name)}}]


def headless_dns(s: PoolSettings) -> str:
    """The headless Service's name: it resolves to every node (published before ready): `--peers`."""
    return f"{naming.headless_service_name(s.name)}.{s.namespace}.svc"


def tls_dns_names(s: PoolSettings) -> list[str]:
    """Every name clients verify the pool's certificate against (docs/operator.md, TLS): each node's
    own name (what nodes advertise with TLS on), the headless name (peer discovery, Prometheus'
    `serverName`), the client Service (`KVPOOL_URL`) and the lookup Service."""
    domain = f"{s.namespace}.svc"
    out = [f"*.{headless_dns(s)}", headless_dns(s), f"{naming.client_service_name(s.name)}.{domain}"]
    if s.lookup_replicas:
        out.append(f"{naming.lookup_name(s.name)}.{domain}")
    return out


def endpoints(s: PoolSettings) -> dict[str, Any]:
    """Where clients reach the pool (`KVPOOL_URL` and the status): grpcs:// and https:// with TLS."""
    domain = f"{s.namespace}.svc"
    headless = naming.headless_service_name(s.name)
    client = f"{naming.client_service_name(s.name)}.{domain}"
    grpc, http = ("grpcs", "https") if s.tls_secret else ("grpc", "http")
    out: dict[str, Any] = {
        "grpc": f"{grpc}://{client}:{NODE_PORT}",
        "http": f"{http}://{client}:{NODE_HTTP_PORT}",
        "nodes": [
            f"{naming.statefulset_name(s.name)}-{i}.{headless}.{domain}:{NODE_PORT}"
            for i in range(s.replicas)
        ],
    }
    if s.lookup_replicas:
        out["lookup"] = f"{grpc}://{naming.lookup_name(s.name)}.{domain}:{LOOKUP_PORT}"
    return out


def client_secrets(s: PoolSettings) -> dict[str, Any]:
    """What a client pod needs besides the ConfigMap: the token and the CA, by Secret reference."""
    out: dict[str, Any] = {"configMap": naming.configmap_name(s.name)}
    if s.auth_token:
        out["tokenSecret"] = {"name": s.auth_token.name, "key": s.auth_token.key}
    if s.tls_secret:
        out["caSecret"] = {"name": s.tls_secret, "key": CA_KEY}
    return out
