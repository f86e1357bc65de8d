"""Deleting pools and namespaces never waits for the operator: no finalizer, garbage collection."""

from __future__ import annotations

from typing import Any

from .cluster import GROUP, PLURAL, VERSION, Operator, absent, make_namespace, wait_for
from .test_pools import create_pool, get_pool, read_child, wait_running

OPERATOR_FINALIZERS = ("kvpool.io/operator", "kopf.zalando.org/KopfFinalizerMarker")


def test_a_pool_deleted_with_the_operator_stopped_goes_with_its_children(
    k8s: Any, namespace: str, running_operator: Operator
) -> None:
    create_pool(k8s, namespace, "doomed", {"replicas": 1, "memory": "256MiB", "lookup": {"replicas": 1}})
    pool = wait_running(k8s, namespace, "doomed")
    assert not set(pool["metadata"].get("finalizers") or []) & set(OPERATOR_FINALIZERS)
    running_operator.stop()
    k8s.client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "doomed")
    wait_for(lambda: get_pool(k8s, namespace, "doomed") is None, 30, "the pool gone")
    for kind, child in (("StatefulSet", "doomed"), ("Deployment", "doomed-lookup"), ("ConfigMap", "doomed-kvpool"),
                        ("Service", "doomed-nodes")):  # fmt: skip
        wait_for(lambda kind=kind, child=child: read_child(k8s, kind, namespace, child) is None, 60,
                 f"{kind}/{child} collected")  # fmt: skip


def test_a_namespace_deleted_with_the_operator_stopped_goes(k8s: Any, running_operator: Operator) -> None:
    core = k8s.client.CoreV1Api()
    name = make_namespace(k8s, "kvpool-e2e-gone")
    create_pool(k8s, name, "kvpool", {"replicas": 1, "memory": "256MiB"})
    wait_running(k8s, name, "kvpool")
    running_operator.stop()
    core.delete_namespace(name)
    wait_for(lambda: absent(lambda: core.read_namespace(name)) is None, 120, f"namespace {name} deleted")
