"""End to end on a real cluster (kind, minikube, ...): runs only when KUBECONFIG is set.

    kind create cluster --name kvpool
    KUBECONFIG=~/.kube/config pytest tests/e2e -v

Installs the CRD if missing, runs the operator in-process against the cluster, and checks what the
emulator cannot show: server-side defaulting and CEL validation, the scale subresource, garbage
collection by owner references, and the API server accepting every child (server-side apply). The
node image need not be pullable: the checks stop at the objects, not at running pods.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG pointing at a cluster"
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "kvpool.io", "v1alpha1", "kvcachepools"


def wait_for(what: Callable[[], Any], timeout: float = 60, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {message}")


@pytest.fixture(scope="module")
def k8s() -> Iterator[Any]:
    import kubernetes
    import yaml

    kubernetes.config.load_kube_config()
    ext = kubernetes.client.ApiextensionsV1Api()
    crd = yaml.safe_load((ROOT / "crds" / "kvcachepools.yaml").read_text())
    try:
        ext.create_custom_resource_definition(crd)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
    wait_for(
        lambda: any(c.type == "Established" and c.status == "True"
                    for c in (ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or [])),
        message="CRD established",
    )  # fmt: skip
    yield kubernetes


@pytest.fixture(scope="module")
def namespace(k8s: Any) -> Iterator[str]:
    name = f"kvpool-e2e-{uuid.uuid4().hex[:6]}"
    core = k8s.client.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(k8s: Any, namespace: str) -> Iterator[None]:
    from kvpool.operator import runner

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=runner.run, args=([namespace],), kwargs={"health_port": None, "standalone": True, "stop_flag": stop, "ready_flag": ready},
        daemon=True,
    )  # fmt: skip
    thread.start()
    ready.wait(30)
    yield
    stop.set()
    thread.join(30)


def _pool(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KVCachePool",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_examples_pass_server_side_validation(k8s: Any, namespace: str) -> None:
    import yaml

    api = k8s.client.CustomObjectsApi()
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")


def test_pool_lifecycle(k8s: Any, namespace: str, operator: None) -> None:
    api = k8s.client.CustomObjectsApi()
    apps = k8s.client.AppsV1Api()
    created = api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, _pool("e2e", {"replicas": 1, "memory": "256MiB"})
    )
    assert created["spec"]["chunkSize"] == 256  # server-side default
    sts = wait_for(
        lambda: _get(lambda: apps.read_namespaced_stateful_set("e2e", namespace)), message="StatefulSet"
    )
    assert sts.metadata.owner_references[0].uid == created["metadata"]["uid"]
    pool = wait_for(
        lambda: (
            (p := api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "e2e"))
            .get("status", {})
            .get("phase")
            and p
        )
    )
    assert {c["type"] for c in pool["status"]["conditions"]} == {
        "Available",
        "Progressing",
        "Degraded",
        "ConfigValid",
    }

    # CEL: chunkSize is immutable.
    with pytest.raises(k8s.client.ApiException) as err:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "e2e", {"spec": {"chunkSize": 512}}
        )
    assert err.value.status == 422 and "immutable" in err.value.body

    # kubectl scale kvp/e2e --replicas=2: the pod template (so every running node) stays as it is.
    template = apps.read_namespaced_stateful_set("e2e", namespace).spec.template.to_dict()
    api.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, "e2e", {"spec": {"replicas": 2}}
    )
    wait_for(
        lambda: apps.read_namespaced_stateful_set("e2e", namespace).spec.replicas == 2,
        message="scaled StatefulSet",
    )
    assert apps.read_namespaced_stateful_set("e2e", namespace).spec.template.to_dict() == template

    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "e2e")
    wait_for(
        lambda: _get(lambda: apps.read_namespaced_stateful_set("e2e", namespace)) is None,
        message="children deleted",
    )


def _get(fn: Callable[[], Any]) -> Any:
    import kubernetes

    try:
        return fn()
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
