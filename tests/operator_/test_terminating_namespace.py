"""A namespace being deleted refuses creations with 403 NamespaceTerminating: no drift, no refusal.

The body is what a Kubernetes 1.32.6 API server answered; tests/e2e deletes a namespace under a
running operator for real."""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client.exceptions import ApiException

from kvpool.operator import handlers
from kvpool.operator.kube import namespace_terminating
from kvpool.operator.settings import parse

TERMINATING_BODY = {
    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
    "message": 'configmaps "x" is forbidden: unable to create new content in namespace ns because it is being terminated',
    "details": {"name": "x", "kind": "configmaps",
                "causes": [{"reason": "NamespaceTerminating", "message": "namespace ns is being terminated",
                            "field": "metadata.namespace"}]},
}  # fmt: skip
RBAC_BODY = {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
             "message": 'configmaps "x" is forbidden: User "system:serviceaccount:a:b" cannot create resource'}  # fmt: skip


def refusal(body: dict[str, Any]) -> ApiException:
    exc = ApiException(status=403, reason="Forbidden")
    exc.body = json.dumps(body)
    return exc


class RefusingKube:
    def __init__(self, exc: ApiException) -> None:
        self.exc = exc

    def apply(self, obj: dict[str, Any], current: Any = None) -> str:
        raise self.exc


def test_only_a_terminating_namespace_is_recognised() -> None:
    assert namespace_terminating(refusal(TERMINATING_BODY))
    assert not namespace_terminating(refusal(RBAC_BODY))
    assert not namespace_terminating(ApiException(status=403, reason="Forbidden"))


def _observed() -> handlers.Observed:
    pool = {"metadata": {"name": "pool", "namespace": "ns", "uid": "u"}, "spec": {"replicas": 1}}
    s = parse("pool", "ns", pool["spec"])
    desired = handlers.builders.desired(pool, s, False)
    return handlers.Observed(s, None, desired, [None] * len(desired), None, None)


def test_children_of_a_terminating_namespace_are_no_refusals() -> None:
    outcome, refused = handlers.apply_children(RefusingKube(refusal(TERMINATING_BODY)), _observed())  # type: ignore[arg-type]
    assert refused == [] and set(outcome.values()) == {handlers.TERMINATING}
    outcome, refused = handlers.apply_children(RefusingKube(refusal(RBAC_BODY)), _observed())  # type: ignore[arg-type]
    assert set(outcome.values()) == {"refused"} and all("403 Forbidden" in r for r in refused)
