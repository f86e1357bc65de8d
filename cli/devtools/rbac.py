"""The operator's RBAC rules: the single source the Helm chart renders (`python -m kvpool.cli.devtools.rbac`).

Least privilege: the operator never lists or watches its children (it addresses them by name), reads
pools, writes their status and finalizers, and kopf needs its peering objects and Events. A test runs
the real operator through a pool's whole life and checks every API call it made against `RULES`.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from kvpool.operator.naming import GROUP, MANAGER, PLURAL

CHILD_VERBS = ["get", "create", "patch", "delete"]

NAMESPACED_RULES: list[dict[str, Any]] = [
    # The pools themselves: kopf lists and watches them, patches finalizers, annotations and status.
    # The webhook reads the pool a pod names.
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    # Children carry blockOwnerDeletion owner references: clusters that enforce owner-reference
    # permissions (OwnerReferencesPermissionEnforcement) require update on the owner's finalizers.
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/finalizers"], "verbs": ["update"]},
    # Children, by name only.
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": CHILD_VERBS},
    {"apiGroups": ["apps"], "resources": ["statefulsets", "deployments"], "verbs": CHILD_VERBS},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": CHILD_VERBS},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": CHILD_VERBS},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors"], "verbs": CHILD_VERBS},
    # kopf: Events about pools, peering between operator replicas in watched namespaces.
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["get", "list", "watch", "patch"]},
]
"""What the operator does inside the namespaces it watches (a RoleBinding per namespace suffices)."""

CLUSTER_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
"""Cluster-scoped objects: always a ClusterRoleBinding."""

WEBHOOK_RULES: list[dict[str, Any]] = [
    # The webhook keeps its own CA in the caBundle of its configuration (`--webhook-config-name`).
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "verbs": ["get", "patch"],
    },
]
"""Only with the operator's own certificate, and only ever with `resourceNames` (``webhook_rules``):
patching any webhook configuration would let the operator redirect every admission in the cluster."""

RULES: list[dict[str, Any]] = NAMESPACED_RULES + CLUSTER_RULES  # fmt: skip
"""Without `--webhook-config-name` (cert-manager keeps the caBundle, or no webhook)."""


def webhook_rules(config_name: str) -> list[dict[str, Any]]:
    """``WEBHOOK_RULES`` narrowed to the one MutatingWebhookConfiguration the operator keeps current."""
    return [{**rule, "resourceNames": [config_name]} for rule in WEBHOOK_RULES]


def rules(webhook_config_name: str | None = None) -> list[dict[str, Any]]:
    """Every rule the operator needs; with the webhook rule when it keeps `webhook_config_name`'s CA."""
    return RULES + (webhook_rules(webhook_config_name) if webhook_config_name else [])


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


def allows(
    group: str,
    resource: str,
    subresource: str | None,
    verb_: str,
    name: str | None = None,
    rules_: list[dict[str, Any]] | None = None,
) -> bool:
    """Whether `rules_` (default ``RULES``) allow the call; a rule with `resourceNames` allows only
    calls on one of those objects, as the API server's authorizer does."""
    what = f"{resource}/{subresource}" if subresource else resource
    return any(
        group in rule["apiGroups"]
        and what in rule["resources"]
        and verb_ in rule["verbs"]
        and ("resourceNames" not in rule or name in rule["resourceNames"])
        for rule in (RULES if rules_ is None else rules_)
    )


def cluster_role(name: str = MANAGER, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "kvpool", "app.kubernetes.io/component": "operator"}},
        "rules": RULES if rules is None else rules,
    }  # fmt: skip


def chart_rules() -> str:
    """charts/kvpool/files/rbac-rules.yaml: the rules the chart renders (a test keeps it current). The
    chart adds `webhook` (with `resourceNames`) only where the operator keeps its own caBundle."""
    header = (
        "# Generated by `python -m kvpool.cli.devtools.rbac --chart`; do not edit (tests/chart checks it).\n"
    )
    return header + yaml.safe_dump(
        {"namespaced": NAMESPACED_RULES, "cluster": CLUSTER_RULES, "webhook": WEBHOOK_RULES}, sort_keys=False
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--chart"]:
        sys.stdout.write(chart_rules())
    elif args[:1] == ["--webhook-config-name"] and len(args) == 2:
        yaml.safe_dump(cluster_role(rules=rules(args[1])), sys.stdout, sort_keys=False)
    elif not args:
        yaml.safe_dump(cluster_role(), sys.stdout, sort_keys=False)
    else:
        sys.exit("usage: python -m kvpool.cli.devtools.rbac [--chart | --webhook-config-name NAME]")
