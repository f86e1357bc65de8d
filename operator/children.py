"""The full set of children a pool should have, and the ones to remove when switched off."""

from __future__ import annotations

from typing import Any

from . import configmap, lookup, naming, networkpolicy, pdb, servicemonitor, services, statefulset
from .settings import PoolSettings

# (apiVersion, kind) of every kind the operator may create; the order is the creation order.
KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    (servicemonitor.API_VERSION, "ServiceMonitor"),
)


def desired(owner: dict[str, Any], s: PoolSettings, service_monitors: bool) -> list[dict[str, Any]]:
    """Children to apply. `service_monitors`: whether the cluster serves the ServiceMonitor kind."""
    out = [
        configmap.build(owner, s),
        services.headless(owner, s),
        services.client(owner, s),
        statefulset.build(owner, s),
        lookup.build(owner, s),
        services.lookup(owner, s),
    ]
    if s.pdb_enabled:
        out.append(pdb.build(owner, s))
    if s.network_policy:
        out.append(networkpolicy.build(owner, s))
    if s.service_monitor and service_monitors:
        out.append(servicemonitor.build(owner, s))
    return out


def all_names(pool: str) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of every child a pool can have: what deleting a pool removes."""
    sts = naming.statefulset_name(pool)
    return [
        ("v1", "ConfigMap", naming.configmap_name(pool)),
        ("v1", "Service", naming.headless_service_name(pool)),
        ("v1", "Service", naming.client_service_name(pool)),
        ("v1", "Service", naming.lookup_name(pool)),
        ("apps/v1", "StatefulSet", sts),
        ("apps/v1", "Deployment", naming.lookup_name(pool)),
        ("policy/v1", "PodDisruptionBudget", sts),
        ("networking.k8s.io/v1", "NetworkPolicy", sts),
        (servicemonitor.API_VERSION, "ServiceMonitor", sts),
    ]


def unwanted(s: PoolSettings) -> list[tuple[str, str, str]]:
    """Optional children that the current spec switched off."""
    sts = naming.statefulset_name(s.name)
    out = []
    if not s.pdb_enabled:
        out.append(("policy/v1", "PodDisruptionBudget", sts))
    if not s.network_policy:
        out.append(("networking.k8s.io/v1", "NetworkPolicy", sts))
    if not s.service_monitor:
        out.append((servicemonitor.API_VERSION, "ServiceMonitor", sts))
    return out
