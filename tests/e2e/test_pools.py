"""Pools on a real API server: every example rolled out, scaled, repaired, left alone when unchanged.

What the emulator cannot show: server-side apply, defaulting and CEL; quantities the API server
rewrites (`1024Gi` is stored as `1Ti`); the scale subresource; Pod Security `restricted` admission of
our pods; StatefulSets and Deployments whose pods become Ready; children deleted behind our back.
"""

from __future__ import annotations

import copy
import pathlib
import tempfile
import time
from typing import Any

import pytest
import yaml

from kvpool.operator import builders, settings
from kvpool.operator.webhook import certs

from .cluster import GROUP, PLURAL, ROOT, STATUS_INTERVAL, VERSION, Operator, absent, pool_body, wait_for

EXAMPLES = sorted(p for p in (ROOT / "examples").glob("pool-*.yaml"))


def fit_to_test_cluster(spec: dict[str, Any]) -> dict[str, Any]:
    """The example's spec with only what a small test cluster cannot give changed: less memory and
    disk, the cluster's default StorageClass, no node selector or tolerations for absent nodes."""
    spec = copy.deepcopy(spec)
    if "memory" in spec:
        spec["memory"] = "256MiB"
    limits = (spec.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        limits["memory"] = "1Gi"
    for key in ("requests", "limits"):
        if "cpu" in ((spec.get("resources") or {}).get(key) or {}):
            spec["resources"][key]["cpu"] = "100m"
    if "disk" in spec:
        spec["disk"] = {"size": "1Gi"}
    scheduling = spec.get("scheduling") or {}
    scheduling.pop("nodeSelector", None)
    scheduling.pop("tolerations", None)
    return spec


def create_secrets(k8s: Any, namespace: str, spec: dict[str, Any], pool: str) -> None:
    """The Secrets an example names: a token, a TLS certificate for the pool's names, credentials."""
    core = k8s.client.CoreV1Api()

    def secret(name: str, data: dict[str, str]) -> None:
        core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})

    if token := (spec.get("auth") or {}).get("tokenSecret"):
        secret(token["name"], {token.get("key", "token"): "e2e-" + "x" * 40})
    if tls := (spec.get("tls") or {}).get("secretName"):
        workdir = pathlib.Path(tempfile.mkdtemp(prefix="kvpool-e2e-tls-"))
        names = [f"{pool}.{namespace}.svc", f"*.{pool}-nodes.{namespace}.svc", f"{pool}-nodes.{namespace}.svc",
                 f"{pool}-lookup.{namespace}.svc"]  # fmt: skip
        certs.ensure(workdir, names)
        secret(tls, {key: (workdir / key).read_text() for key in ("tls.crt", "tls.key", "ca.crt")})
    tiers = spec.get("tiers") or {}
    if creds := (tiers.get("redis") or {}).get("credentialsSecret"):
        secret(creds["name"], {creds.get("passwordKey", "password"): "e2e"})
    if creds := (tiers.get("s3") or {}).get("credentialsSecret"):
        secret(creds["name"], {"AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e"})


def get_pool(k8s: Any, namespace: str, name: str) -> dict[str, Any] | None:
    api = k8s.client.CustomObjectsApi()
    return absent(lambda: api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))


def wait_running(k8s: Any, namespace: str, name: str, timeout: float = 120) -> dict[str, Any]:
    """The pool once its status reports its current generation Running."""

    def running() -> dict[str, Any] | None:
        pool = get_pool(k8s, namespace, name) or {}
        st = pool.get("status") or {}
        current = st.get("observedGeneration") == pool.get("metadata", {}).get("generation")
        return pool if current and st.get("phase") == "Running" else None

    return wait_for(running, timeout, f"pool {namespace}/{name} Running")


def read_child(k8s: Any, kind: str, namespace: str, name: str) -> Any:
    core, apps = k8s.client.CoreV1Api(), k8s.client.AppsV1Api()
    read = {
        "ConfigMap": core.read_namespaced_config_map,
        "Service": core.read_namespaced_service,
        "StatefulSet": apps.read_namespaced_stateful_set,
        "Deployment": apps.read_namespaced_deployment,
        "PodDisruptionBudget": k8s.client.PolicyV1Api().read_namespaced_pod_disruption_budget,
        "NetworkPolicy": k8s.client.NetworkingV1Api().read_namespaced_network_policy,
    }[kind]
    return absent(lambda: read(name, namespace))


def create_pool(k8s: Any, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    api = k8s.client.CustomObjectsApi()
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pool_body(name, spec))


def test_examples_pass_server_side_validation(k8s: Any, namespace: str) -> None:
    api = k8s.client.CustomObjectsApi()
    for path in EXAMPLES:
        body = yaml.safe_load(path.read_text())
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_rolls_out(k8s: Any, namespace: str, operator: Operator, example: pathlib.Path) -> None:
    """Every child accepted and owned, pods Ready, conditions at the pool's generation."""
    body = yaml.safe_load(example.read_text())
    name, spec = body["metadata"]["name"], fit_to_test_cluster(body["spec"])
    create_secrets(k8s, namespace, spec, name)
    created = create_pool(k8s, namespace, name, spec)
    assert created["spec"]["chunkSize"] == 256  # server-side default (or the example's own)
    pool = wait_running(k8s, namespace, name)
    generation = pool["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in pool["status"]["conditions"]} == {
        "Available": "True", "Progressing": "False", "Degraded": "False", "ConfigValid": "True"
    }  # fmt: skip
    assert all(c["observedGeneration"] == generation for c in pool["status"]["conditions"])

    s = settings.parse(name, namespace, pool["spec"])
    for child in builders.desired(pool, s, service_monitors=False):
        obj = read_child(k8s, child["kind"], namespace, child["metadata"]["name"])
        assert obj is not None, f"{child['kind']}/{child['metadata']['name']} missing"
        assert obj.metadata.owner_references[0].uid == created["metadata"]["uid"]
        managers = {(m.manager, m.operation) for m in obj.metadata.managed_fields}
        assert ("kvpool-operator", "Apply") in managers, managers
    sts = read_child(k8s, "StatefulSet", namespace, name)
    assert sts.status.ready_replicas == s.replicas
    if s.lookup_replicas:

        def lookup_ready() -> bool:
            lookup = read_child(k8s, "Deployment", namespace, f"{name}-lookup")
            return bool(lookup and lookup.status.ready_replicas == s.lookup_replicas)

        wait_for(lookup_ready, message="the lookup Deployment ready")
    pods = k8s.client.CoreV1Api().list_namespaced_pod(
        namespace, label_selector=f"app.kubernetes.io/instance={name},app.kubernetes.io/component=cache-node"
    )
    assert len(pods.items) == s.replicas
    assert all(
        any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) for p in pods.items
    )


def test_scale_subresource_keeps_the_pod_template(k8s: Any, namespace: str, operator: Operator) -> None:
    apps = k8s.client.AppsV1Api()
    create_pool(k8s, namespace, "scaled", {"replicas": 1, "memory": "256MiB"})
    wait_running(k8s, namespace, "scaled")
    template = apps.read_namespaced_stateful_set("scaled", namespace).spec.template.to_dict()
    api = k8s.client.CustomObjectsApi()
    api.patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, "scaled", {"spec": {"replicas": 2}}
    )
    pool = wait_running(k8s, namespace, "scaled")
    assert pool["status"]["readyReplicas"] == 2
    assert apps.read_namespaced_stateful_set("scaled", namespace).spec.template.to_dict() == template

    # CEL: chunkSize is immutable.
    with pytest.raises(k8s.client.ApiException) as err:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "scaled", {"spec": {"chunkSize": 512}}
        )
    assert err.value.status == 422 and "immutable" in err.value.body


def test_a_disk_written_1024Gi_stays_valid_and_scalable(k8s: Any, namespace: str, operator: Operator) -> None:
    """The API server stores the claim as `1Ti`; the pool must not turn Invalid over the spelling."""
    create_pool(k8s, namespace, "bigdisk", {"replicas": 1, "memory": "256MiB", "disk": {"size": "1024Gi"}})
    wait_running(k8s, namespace, "bigdisk")
    stored = read_child(k8s, "StatefulSet", namespace, "bigdisk").spec.volume_claim_templates[0]
    assert stored.spec.resources.requests["storage"] == "1Ti"
    time.sleep(3 * STATUS_INTERVAL)  # several status passes over the stored form
    pool = wait_running(k8s, namespace, "bigdisk")
    assert {c["type"]: c["status"] for c in pool["status"]["conditions"]}["ConfigValid"] == "True"
    k8s.client.CustomObjectsApi().patch_namespaced_custom_object_scale(
        GROUP, VERSION, namespace, PLURAL, "bigdisk", {"spec": {"replicas": 2}}
    )
    pool = wait_running(k8s, namespace, "bigdisk")
    assert pool["status"]["readyReplicas"] == 2


def test_deleted_and_edited_children_come_back(k8s: Any, namespace: str, operator: Operator) -> None:
    core = k8s.client.CoreV1Api()
    create_pool(k8s, namespace, "healing", {"replicas": 1, "memory": "256MiB"})
    wait_running(k8s, namespace, "healing")
    before = {
        kind: read_child(k8s, kind, namespace, child).metadata.uid
        for kind, child in (("ConfigMap", "healing-kvpool"), ("Service", "healing-nodes"), ("StatefulSet", "healing"))
    }  # fmt: skip
    core.delete_namespaced_config_map("healing-kvpool", namespace)
    core.delete_namespaced_service("healing-nodes", namespace)
    k8s.client.AppsV1Api().delete_namespaced_stateful_set(
        "healing", namespace, propagation_policy="Background"
    )
    # Someone edits the client Service's selector by hand (it would route to nothing).
    core.patch_namespaced_service(
        "healing", namespace, {"spec": {"selector": {"app.kubernetes.io/component": "x"}}}
    )
    for kind, child in (
        ("ConfigMap", "healing-kvpool"),
        ("Service", "healing-nodes"),
        ("StatefulSet", "healing"),
    ):
        wait_for(
            lambda kind=kind, child=child: (
                (obj := read_child(k8s, kind, namespace, child)) and obj.metadata.uid != before[kind]
            ),
            timeout=10 * STATUS_INTERVAL,
            message=f"{kind}/{child} recreated",
        )
    wait_for(
        lambda: (
            read_child(k8s, "Service", namespace, "healing").spec.selector["app.kubernetes.io/component"]
            == "cache-node"
        ),
        timeout=10 * STATUS_INTERVAL,
        message="the edited Service repaired",
    )
    wait_running(k8s, namespace, "healing")


def test_an_operator_restart_rewrites_nothing(k8s: Any, namespace: str, operator: Operator) -> None:
    """Resuming an unchanged pool sends no write: every child keeps its resourceVersion."""
    create_pool(k8s, namespace, "steady", {"replicas": 2, "memory": "10GiB", "disk": {"size": "10240Mi"}})
    wait_running(k8s, namespace, "steady")
    kinds = (("ConfigMap", "steady-kvpool"), ("Service", "steady-nodes"), ("Service", "steady"),
             ("StatefulSet", "steady"))  # fmt: skip
    versions = {(k, n): read_child(k8s, k, namespace, n).metadata.resource_version for k, n in kinds}
    generation = read_child(k8s, "StatefulSet", namespace, "steady").metadata.generation
    since = len(operator.text())
    operator.stop()
    operator.start()
    wait_for(lambda: f"Reconciled {namespace}/steady" in operator.text()[since:], 60, "the resumed pool")
    time.sleep(2 * STATUS_INTERVAL)
    log = operator.text()[since:]
    assert f"Reconciled {namespace}/steady: no changes" in log, log[-3000:]
    assert read_child(k8s, "StatefulSet", namespace, "steady").metadata.generation == generation
    for (kind, child), version in versions.items():
        if kind != "StatefulSet":  # its status may move; its generation above may not
            assert read_child(k8s, kind, namespace, child).metadata.resource_version == version, kind


def test_a_pool_whose_pods_cannot_be_scheduled_is_pending(
    k8s: Any, namespace: str, operator: Operator
) -> None:
    spec = {"replicas": 2, "memory": "256MiB", "scheduling": {"nodeSelector": {"kvpool.io/e2e": "nowhere"}}}
    create_pool(k8s, namespace, "unplaced", spec)
    pods = k8s.client.CoreV1Api()
    wait_for(
        lambda: (
            len(
                pods.list_namespaced_pod(
                    namespace,
                    label_selector="app.kubernetes.io/instance=unplaced,app.kubernetes.io/component=cache-node",
                ).items
            )
            == 2
        ),
        message="the pods created",
    )
    time.sleep(3 * STATUS_INTERVAL)  # several status passes over the Pending pods
    pool = get_pool(k8s, namespace, "unplaced") or {}
    assert pool["status"]["phase"] == "Pending", pool["status"]
    assert pool["status"]["observedGeneration"] == pool["metadata"]["generation"]
    conditions = {c["type"]: c for c in pool["status"]["conditions"]}
    assert conditions["Degraded"]["status"] == "False" and conditions["Available"]["status"] == "False"
