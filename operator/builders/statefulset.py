"""The cache-node StatefulSet: stable identities for rendezvous placement, a disk per node.

Each node gets its identity from the downward API (`KVPOOL_NODE_ID` = the pod name, stable across
restarts) and advertises where clients dial it (`KVPOOL_ADVERTISE_HOST`): the pod IP, or with TLS
the pod's stable DNS name under the headless Service, a name its certificate can carry (clients
verify the host they dial). It finds its peers through the headless Service (`KVPOOL_PEERS`, in
the ConfigMap). The pod template depends on
the settings, never on `replicas`, so scaling adds or removes pods without restarting the others.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .. import naming, sizing
from ..settings import PoolSettings
from .common import (
    CONFIG_HASH,
    DISK_DIR,
    NODE_COMPONENT,
    NODE_DATA_PORT,
    NODE_HTTP_PORT,
    NODE_PORT,
    NODE_PORTS,
    config_map_source,
    container_ports,
    env,
    flag,
    headless_dns,
    pod_metadata,
    pod_security_context,
    probes,
    restricted_security_context,
    scheduling,
    secret_env,
    security_mounts,
    tmp_volume,
)

PRE_STOP_SECONDS = 5
"""The preStop pause: the Services and the clients' membership see the pod go before it gets SIGTERM."""
SHUTDOWN_SECONDS = 15
"""After the handoff: finishing in-flight calls and flushing pending disk writes."""

TMP_SIZE = "256Mi"
"""The node writes nothing to /tmp itself (its disk tier has its own volume): room for libraries'
temp files (UCX, Python) without letting a runaway writer fill the machine's disk."""
PRE_STOP_COMMAND = ["sleep", str(PRE_STOP_SECONDS)]
"""An exec hook (the image has coreutils): the `sleep` lifecycle action is off by default before 1.30."""
_ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def identity_env(s: PoolSettings) -> list[dict[str, Any]]:
    """`KVPOOL_NODE_ID` from the pod name; `KVPOOL_ADVERTISE_HOST` the pod IP, or with TLS
    `$(KVPOOL_NODE_ID).<pool>-nodes.<ns>.svc` (Kubernetes expands `$(VAR)` from earlier entries)."""
    node_id = env("node_id")
    advertise: dict[str, Any] = (
        {"value": f"$({node_id}).{headless_dns(s)}"}
        if s.tls_secret
        else {"valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    )
    return [
        {"name": node_id, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": env("advertise_host"), **advertise},
    ]


def expand(value: str, earlier: dict[str, str]) -> str:
    """`$(VAR)` replaced as the kubelet does: by an earlier variable's value, else left as it is."""
    return _ENV_REF.sub(lambda m: earlier.get(m.group(1), m.group(0)), value)


def termination_grace_seconds(s: PoolSettings) -> int:
    """preStop + the node's handoff deadline (`KVPOOL_HANDOFF_DEADLINE`) + a clean shutdown."""
    return PRE_STOP_SECONDS + math.ceil(s.handoff_deadline) + SHUTDOWN_SECONDS


def args(s: PoolSettings) -> list[str]:
    """The ports (the Services name them), then the spec's extraArgs."""
    return [flag("port"), str(NODE_PORT), flag("http_port"), str(NODE_HTTP_PORT), flag("data_port"),
            str(NODE_DATA_PORT), *s.extra_args]  # fmt: skip


def pod_env(s: PoolSettings) -> list[dict[str, Any]]:
    """The node container's own env (the ConfigMap comes on top through envFrom)."""
    out = identity_env(s)
    out += secret_env(env("redis_username"), s.redis_username)
    out += secret_env(env("redis_password"), s.redis_password)
    out += secret_env("AWS_ACCESS_KEY_ID", s.s3_access_key)
    out += secret_env("AWS_SECRET_ACCESS_KEY", s.s3_secret_key)
    return out + security_mounts(s)[2] + s.extra_env


def node_environment(s: PoolSettings, config: dict[str, str], pod_name: str, pod_ip: str) -> dict[str, str]:
    """The `KVPOOL_*` variables a node container starts with: the ConfigMap's `config` plus its own
    env, with the downward-API values given; values that come from Secrets are left out."""
    fields = {"metadata.name": pod_name, "status.podIP": pod_ip}
    out = dict(config)
    for item in pod_env(s):
        if "value" in item:
            out[item["name"]] = expand(item["value"], out)
        elif (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") in fields:
            out[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return {k: v for k, v in out.items() if k.startswith("KVPOOL_")}


def resources(s: PoolSettings) -> dict[str, Any]:
    """Memory request = limit = cache + overhead, so neither the kernel nor eviction kills the node."""
    memory = sizing.quantity(s.container_memory)
    out: dict[str, Any] = {"requests": {"memory": memory}, "limits": {"memory": memory}}
    if s.cpu_request:
        out["requests"]["cpu"] = s.cpu_request
    if s.cpu_limit:
        out["limits"]["cpu"] = s.cpu_limit
    return out


def build(owner: dict[str, Any], s: PoolSettings, config_hash: str) -> dict[str, Any]:
    """`config_hash`: the digest of the ConfigMap's data, stamped on the template to roll the pods."""
    extra_volumes, extra_mounts, _ = security_mounts(s)
    volumes: list[dict[str, Any]] = [tmp_volume(TMP_SIZE), *extra_volumes]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if s.disk_size:
        mounts.append({"name": "data", "mountPath": DISK_DIR})
    mounts += extra_mounts
    container = {
        "name": "node",
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": ["kvpool", "node"],
        "args": args(s),
        "envFrom": config_map_source(s),
        "env": pod_env(s),
        "ports": container_ports(NODE_PORTS),
        "resources": resources(s),
        "volumeMounts": mounts,
        "securityContext": restricted_security_context(),
        "lifecycle": {"preStop": {"exec": {"command": PRE_STOP_COMMAND}}},
        **probes("http", bool(s.tls_secret)),
    }
    spec: dict[str, Any] = {
        "replicas": s.replicas,
        "serviceName": naming.headless_service_name(s.name),
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
        "selector": {"matchLabels": naming.selector(s.name, NODE_COMPONENT)},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": s.disk_reclaim, "whenScaled": "Retain"},
        "template": {
            "metadata": pod_metadata(
                s, NODE_COMPONENT, {CONFIG_HASH: config_hash}, naming.image_version(s.image)
            ),
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": termination_grace_seconds(s),
                "securityContext": pod_security_context(),
                "containers": [container],
                "volumes": volumes,
                **({"serviceAccountName": s.service_account} if s.service_account else {}),
                **scheduling(s, NODE_COMPONENT),
            },
        },
    }
    if s.disk_size:
        claim: dict[str, Any] = {
            "metadata": {"name": "data", "labels": naming.selector(s.name, NODE_COMPONENT)},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": s.disk_size}}},
        }
        if s.storage_class:
            claim["spec"]["storageClassName"] = s.storage_class
        spec["volumeClaimTemplates"] = [claim]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": naming.metadata(owner, naming.statefulset_name(s.name), NODE_COMPONENT),
        "spec": spec,
    }


def _claims(sts: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(storage request, storage class) of each volume claim template."""
    return [
        ((c.get("spec") or {}).get("resources", {}).get("requests", {}).get("storage"),
         (c.get("spec") or {}).get("storageClassName"))
        for c in (sts.get("spec") or {}).get("volumeClaimTemplates") or []
    ]  # fmt: skip


def _same_claim(old: tuple[Any, Any], new: tuple[Any, Any]) -> bool:
    """By value: the API server stores a `1024Gi` claim as `1Ti`. No class asked for: any will do."""
    size_same = old[0] == new[0] or sizing.same_quantity(old[0], new[0])
    return size_same and (not new[1] or old[1] == new[1])


def immutable_change(current: dict[str, Any] | None, desired: dict[str, Any]) -> str | None:
    """Why `desired` cannot be applied over `current` (the API server refuses volume-claim changes).

    The CRD's CEL rules (`disk: self == oldSelf`, `has(self.disk) == has(oldSelf.disk)`) already
    refuse such a spec change; this check stays for API servers that skip them (and kmock), and
    names the conflict in ConfigValid instead of a refused StatefulSet patch."""
    if current is None:
        return None
    old, new = _claims(current), _claims(desired)
    if len(old) != len(new) or not all(map(_same_claim, old, new)):
        return (
            f"spec.disk cannot change after the pool is created (StatefulSet volume claims are immutable): "
            f"running with {old or 'no disk'}, spec asks for {new or 'no disk'}; create a new pool instead"
        )
    return None
