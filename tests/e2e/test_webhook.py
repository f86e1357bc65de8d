"""The pod-injection webhook called by a real API server through the chart's configuration.

Pods are created with `dryRun=All`: admission (mutating webhooks included) runs in full and the
answer is the pod as it would be stored, so nothing has to be cleaned up and nothing runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kvpool.operator.webhook.patch import AGENT_CONTAINER, INJECTED_ANNOTATION, SKIP_ANNOTATION

from .cluster import Operator, delete_namespace, make_namespace, wait_for
from .test_pools import create_pool, wait_running


def vllm_pod(labels: dict[str, str], pool: str = "kvpool") -> dict[str, Any]:
    return {
        "metadata": {"generateName": "vllm-", "labels": labels, "annotations": {"kvpool.io/pool": pool}},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                                 "command": ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]}]},
    }  # fmt: skip


def admitted(k8s: Any, namespace: str, pod: dict[str, Any]) -> Any:
    return k8s.client.CoreV1Api().create_namespaced_pod(namespace, pod, dry_run="All")


def injected(pod: Any) -> bool:
    return AGENT_CONTAINER in [c.name for c in pod.spec.init_containers or []]


OPTED_IN = {"kvpool.io/inject": "true"}


@pytest.fixture(scope="module")
def apps_namespace(k8s: Any, operator: Operator) -> Iterator[str]:
    """A namespace for engine pods (no Pod Security enforcement: vLLM images run as root)."""
    name = make_namespace(k8s, "kvpool-e2e-apps")
    create_pool(k8s, name, "kvpool", {"replicas": 1, "memory": "256MiB"})
    wait_running(k8s, name, "kvpool")
    yield name
    delete_namespace(k8s, name)


def test_opted_in_pods_are_injected_others_are_not(
    k8s: Any, apps_namespace: str, running_operator: Operator
) -> None:
    # The operator puts its CA into the configuration's caBundle; until then calls fail open.
    pod = wait_for(lambda: (p := admitted(k8s, apps_namespace, vllm_pod(OPTED_IN))) and injected(p) and p,
                   timeout=60, message="the webhook injecting an opted-in pod")  # fmt: skip
    assert pod.metadata.annotations[INJECTED_ANNOTATION] == f"{apps_namespace}/kvpool"
    vllm = next(c for c in pod.spec.containers if c.name == "vllm")
    assert "--kv-transfer-config" in (vllm.args or []) + (vllm.command or [])

    plain = admitted(k8s, apps_namespace, vllm_pod({"app": "vllm"}))
    assert not injected(plain)
    assert SKIP_ANNOTATION not in (plain.metadata.annotations or {}), (
        "the webhook was called for an un-labelled pod"
    )

    system = admitted(k8s, "kube-system", vllm_pod(OPTED_IN))
    assert not injected(system)
    assert SKIP_ANNOTATION not in (system.metadata.annotations or {}), "the webhook was called in kube-system"

    missing = admitted(k8s, apps_namespace, vllm_pod(OPTED_IN, pool="no-such-pool"))
    assert not injected(missing)
    assert "not found" in missing.metadata.annotations[SKIP_ANNOTATION]


def test_pods_are_admitted_uninjected_while_the_operator_is_down(
    k8s: Any, apps_namespace: str, running_operator: Operator
) -> None:
    wait_for(lambda: injected(admitted(k8s, apps_namespace, vllm_pod(OPTED_IN))), 60, "the webhook up")
    running_operator.stop()
    started = time.monotonic()
    pod = admitted(k8s, apps_namespace, vllm_pod(OPTED_IN))
    took = time.monotonic() - started
    assert not injected(pod) and SKIP_ANNOTATION not in (pod.metadata.annotations or {})
    assert took < 10, f"admission took {took:.1f} s with the webhook down"
    # Created for real too, not only in a dry run.
    real = k8s.client.CoreV1Api().create_namespaced_pod(apps_namespace, vllm_pod(OPTED_IN))
    assert not injected(real)
    k8s.client.CoreV1Api().delete_namespaced_pod(real.metadata.name, apps_namespace, grace_period_seconds=0)
