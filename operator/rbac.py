"""The operator's RBAC rules: the single source the Helm chart renders (`python -m kvpool.operator.rbac`).

Least privilege: the operator never lists or watches its children (it addresses them by name), reads
pools, writes their status and finalizers, and kopf needs its peering objects and Events. A test runs
the real operator through a pool's whole life and checks every API call it made against `RULES`.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from .naming import GROUP, MANAGER, PLURAL

CHILD_VERBS = ["get", "create", "patch", "delete"]

RULES: list[dict[str, Any]] = [
    # The pools themselves: kopf lists and watches them, patches finalizers, annotations and status.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # Children, by name only.
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": CHILD_VERBS},
    {"apiGroups": ["apps"], "resources": ["statefulsets", "deployments"], "verbs": CHILD_VERBS},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": CHILD_VERBS},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": CHILD_VERBS},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors"], "verbs": CHILD_VERBS},
    # kopf: Events about pools, peering between operator replicas, CRD changes.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings", "clusterkopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]  # fmt: skip

_VERBS = {
    "LIST": "list",
    "WATCH": "watch",
    "FETCH": "get",
    "CREATE": "create",
    "UPDATE": "patch",
    "DELETE": "delete",
}


def verb(action: str, watch: bool = False) -> str:
    """The RBAC verb of an API action (as kmock names actions: LIST, WATCH, FETCH, ...)."""
    return "watch" if watch else _VERBS[action.upper()]


def allows(group: str, resource: str, subresource: str | None, verb_: str) -> bool:
    name = f"{resource}/{subresource}" if subresource else resource
    return any(
        group in rule["apiGroups"] and name in rule["resources"] and verb_ in rule["verbs"] for rule in RULES
    )


def cluster_role(name: str = MANAGER) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kvpool", "app.kubernetes.io/component": "operator"}},
        "rules": RULES,
    }  # fmt: skip


if __name__ == "__main__":
    yaml.safe_dump(cluster_role(), sys.stdout, sort_keys=False)
