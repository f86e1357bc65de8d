"""The children of a pool, one builder per kind; the parts they share live in `common`.

`desired` renders what a pool should have, `unwanted` what its spec switched off, and `check`
refuses settings a node would refuse (deleting a pool is the garbage collector's work). Pure.
"""

from __future__ import annotations

from typing import Any

from kvpool.cachenode.core import settings as registry

from .. import naming
from ..settings import InvalidSpec, PoolSettings
from . import configmap, lookup, networkpolicy, pdb, servicemonitor, services, statefulset
from .common import SERVICE_MONITOR_API_VERSION, config_hash, endpoints

__all__ = ["KINDS", "check", "desired", "endpoints", "unwanted"]

# (apiVersion, kind) of every kind the operator may create; the order is the creation order.
KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    (SERVICE_MONITOR_API_VERSION, "ServiceMonitor"),
)


def desired(owner: dict[str, Any], s: PoolSettings, service_monitors: bool) -> list[dict[str, Any]]:
    """Children to apply. `service_monitors`: whether the cluster serves the ServiceMonitor kind."""
    config = configmap.build(owner, s)
    digest = config_hash(config["data"])
    out = [
        config,
        services.headless(owner, s),
        services.client(owner, s),
        statefulset.build(owner, s, digest),
    ]
    if s.lookup_replicas:
        out += [lookup.build(owner, s), services.lookup(owner, s)]
    if s.pdb_enabled:
        out.append(pdb.build(owner, s))
    if s.network_policy:
        out.append(networkpolicy.build(owner, s))
    if s.service_monitor and service_monitors:
        out.append(servicemonitor.build(owner, s))
    return out


def check(s: PoolSettings) -> None:
    """Raise InvalidSpec if `kvpool node` would refuse the settings this pool gives its nodes."""
    env = statefulset.node_environment(s, configmap.data(s), pod_name=f"{s.name}-0", pod_ip="10.0.0.1")
    try:
        registry.check_node_env(env)
    except ValueError as exc:
        raise InvalidSpec(f"a cache node would refuse these settings: {exc}") from None


def unwanted(s: PoolSettings) -> list[tuple[str, str, str]]:
    """Optional children that the current spec switched off."""
    sts = naming.statefulset_name(s.name)
    out = []
    if not s.lookup_replicas:
        out += [
            ("apps/v1", "Deployment", naming.lookup_name(s.name)),
            ("v1", "Service", naming.lookup_name(s.name)),
        ]
    if not s.pdb_enabled:
        out.append(("policy/v1", "PodDisruptionBudget", sts))
    if not s.network_policy:
        out.append(("networking.k8s.io/v1", "NetworkPolicy", sts))
    if not s.service_monitor:
        out.append((SERVICE_MONITOR_API_VERSION, "ServiceMonitor", sts))
    return out
