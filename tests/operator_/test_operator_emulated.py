"""The real operator against kmock's emulator: create, update, invalid spec, scale, status, delete."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import kmock
import kopf
import pytest

from kvpool.cli.devtools import rbac
from kvpool.operator import handlers, settings

from .conftest import NS, POOLS, Cluster

STS, DEPLOY, SVC, CM, PDB = (
    "apps/v1/statefulsets",
    "apps/v1/deployments",
    "v1/services",
    "v1/configmaps",
    "policy/v1/poddisruptionbudgets",
)
CHILDREN = [
    (CM, "p1-kvpool"),
    (SVC, "p1-nodes"),
    (SVC, "p1"),
    (STS, "p1"),
    (PDB, "p1"),
]


def condition(pool: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((pool or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


async def settled(cluster: Cluster, name: str = "p1", generation: int = 1) -> dict[str, Any]:
    """Wait until the pool's status reflects `generation`."""
    return await cluster.wait_for(
        lambda: (
            (p := cluster.get(POOLS, name))
            and (p.get("status") or {}).get("observedGeneration") == generation
            and p
        ),
        message=f"status of generation {generation}",
    )


def writes_to_children(cluster: Cluster, since: int) -> list[str]:
    return [
        f"{r.method} {r.url.path}"
        for r in cluster.requests()[since:]
        if r.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE)
        and r.resource is not None and r.resource.plural != "kvcachepools" and r.resource.plural != "events"
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_create_makes_owned_children_and_status(cluster: Cluster) -> None:
    created = await cluster.create_pool("p1", {"replicas": 2, "memory": "1GiB"})
    for resource, name in CHILDREN:
        obj = await cluster.wait_for(
            lambda r=resource, n=name: cluster.get(r, n), message=f"{resource} {name}"
        )
        (ref,) = obj["metadata"]["ownerReferences"]
        assert (
            ref["uid"] == created["metadata"]["uid"]
            and ref["kind"] == "KVCachePool"
            and ref["controller"] is True
        )
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "p1"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kvpool-operator"
    sts = cluster.get(STS, "p1")
    assert sts["spec"]["replicas"] == 2
    node = sts["spec"]["template"]["spec"]["containers"][0]
    # The node's flags: ports as arguments, identity from the downward API, peers from the ConfigMap.
    assert node["command"] == ["kvpool", "node"]
    assert node["args"] == ["--port", "7400", "--http-port", "7401", "--data-port", "7402"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in node["env"]}
    assert env["KVPOOL_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KVPOOL_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert node["envFrom"] == [{"configMapRef": {"name": "p1-kvpool"}}]
    # 1 GiB cache + 256 MiB base + 4 x 64 MiB buffers + 1/64 index = 1552 MiB, request = limit.
    assert node["resources"]["limits"]["memory"] == node["resources"]["requests"]["memory"] == "1552Mi"
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http", "scheme": "HTTP"}
    cm = cluster.get(CM, "p1-kvpool")
    assert cm["data"]["KVPOOL_MEMORY"] == str(1024**3)
    assert cm["data"]["KVPOOL_CHUNK_SIZE"] == "256"
    assert cm["data"]["KVPOOL_PEERS"] == f"p1-nodes.{NS}.svc"
    assert cm["data"]["KVPOOL_URL"] == f"grpc://p1.{NS}.svc:7400"
    # The lookup service, one replica by default: replaced with Recreate, ready once rebuilt, its
    # Service reachable before that (holders resync to it, which is what makes it ready).
    lookup = cluster.get(DEPLOY, "p1-lookup")
    assert lookup["spec"]["replicas"] == 1 and lookup["spec"]["strategy"] == {"type": "Recreate"}
    (lc,) = lookup["spec"]["template"]["spec"]["containers"]
    assert lc["command"] == ["kvpool", "lookup"] and "envFrom" not in lc
    assert lc["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert cluster.get(SVC, "p1-lookup")["spec"]["publishNotReadyAddresses"] is True
    pool = await settled(cluster)
    st = pool["status"]
    assert st["phase"] == "Pending" and st["readyReplicas"] == 0
    assert st["memory"] == "1Gi" and st["containerMemory"] == "1552Mi"
    assert st["hashing"] == {
        "algorithm": "blake3",
        "chunkSize": 256,
        "formatVersion": 1,
        "placement": "rendezvous",
        "replicationFactor": 1,
    }
    assert st["endpoints"]["grpc"] == f"grpc://p1.{NS}.svc:7400"
    assert (
        st["selector"]
        == "app.kubernetes.io/name=kvpool,app.kubernetes.io/instance=p1,app.kubernetes.io/component=cache-node"
    )
    assert condition(pool, "ConfigValid")["status"] == "True"
    assert condition(pool, "Available")["status"] == "False"
    assert condition(pool, "Progressing")["status"] == "True"


@pytest.mark.asyncio
async def test_reconciling_again_changes_nothing(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 2})
    await settled(cluster)
    versions = {key: cluster.versions(*key) for key in CHILDREN}
    mark = len(cluster.requests())
    # A label change is an update that kopf hands to the same reconcile; the spec is the same.
    await cluster.patch(
        f"/apis/kvpool.io/v1alpha1/namespaces/{NS}/kvcachepools/p1", {"metadata": {"labels": {"team": "a"}}}
    )
    await cluster.wait_for(
        lambda: any(
            r.resource and r.resource.plural == "statefulsets" and r.action == kmock.action.FETCH
            for r in cluster.requests()[mark:]
        ),
        message="a second reconcile",
    )
    await cluster.wait_for(
        lambda: (
            sum(
                1
                for r in cluster.requests()[mark:]
                if r.resource and r.resource.plural == "poddisruptionbudgets"
            )
            >= 1
        )
    )
    assert writes_to_children(cluster, mark) == []
    assert {key: cluster.versions(*key) for key in CHILDREN} == versions


@pytest.mark.asyncio
async def test_update_rolls_the_statefulset(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 2, "memory": "1GiB"})
    await settled(cluster)
    before = cluster.get(STS, "p1")["spec"]["template"]
    await cluster.patch_pool_spec(
        "p1", {"memory": "2GiB", "tiers": {"redis": {"url": "redis://cache:6379/0"}}}
    )
    pool = await settled(cluster, generation=2)
    after = cluster.get(STS, "p1")["spec"]["template"]
    assert (
        after["metadata"]["annotations"]["kvpool.io/config-hash"]
        != before["metadata"]["annotations"]["kvpool.io/config-hash"]
    )
    assert after["spec"]["containers"][0]["resources"]["limits"]["memory"] == "2592Mi"
    assert cluster.get(CM, "p1-kvpool")["data"]["KVPOOL_REDIS_URL"] == "redis://cache:6379/0"
    assert pool["status"]["memory"] == "2Gi"


@pytest.mark.asyncio
async def test_invalid_spec_sets_condition_and_keeps_children(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 2, "memory": "1GiB"})
    await settled(cluster)
    sts_versions = cluster.versions(STS, "p1")
    await cluster.patch_pool_spec("p1", {"memory": "4GiB", "resources": {"limits": {"memory": "4Gi"}}})
    pool = await settled(cluster, generation=2)
    cond = condition(pool, "ConfigValid")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "resources.limits.memory 4Gi is below spec.memory 4GiB" in cond["message"]
    assert pool["status"]["phase"] == "Invalid"
    assert cluster.versions(STS, "p1") == sts_versions
    assert (
        cluster.get(STS, "p1")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        == "1552Mi"
    )
    # Fixing the spec brings the pool back.
    await cluster.patch_pool_spec("p1", {"resources": {"limits": {"memory": "5Gi"}}})
    pool = await settled(cluster, generation=3)
    assert condition(pool, "ConfigValid")["status"] == "True"
    assert (
        cluster.get(STS, "p1")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        == "5Gi"
    )


@pytest.mark.asyncio
async def test_scale_sets_replicas_and_keeps_the_pod_template(cluster: Cluster) -> None:
    """Scaling must not restart the nodes: the template (and the ConfigMap its hash digests) stay."""
    await cluster.create_pool("p1", {"replicas": 1, "replicationFactor": 2})
    await settled(cluster)
    template = cluster.get(STS, "p1")["spec"]["template"]
    config = cluster.get(CM, "p1-kvpool")["data"]
    config_versions = cluster.versions(CM, "p1-kvpool")
    for generation, replicas in ((2, 5), (3, 2)):
        # What `kubectl scale kvp/p1 --replicas=N` sends (a real server also bumps the generation).
        cluster.generations["p1"] += 1
        await cluster.patch(
            f"/apis/kvpool.io/v1alpha1/namespaces/{NS}/kvcachepools/p1/scale",
            {"metadata": {"generation": cluster.generations["p1"]}, "spec": {"replicas": replicas}},
        )
        pool = await settled(cluster, generation=generation)
        sts = cluster.get(STS, "p1")
        assert sts["spec"]["replicas"] == replicas
        assert sts["spec"]["template"] == template
        assert cluster.get(CM, "p1-kvpool")["data"] == config
        assert len(pool["status"]["endpoints"]["nodes"]) == replicas
        assert pool["status"]["hashing"]["replicationFactor"] == min(2, replicas)
    assert cluster.versions(CM, "p1-kvpool") == config_versions


@pytest.mark.asyncio
async def test_status_reports_a_generation_only_once_its_children_are_applied(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf runs the status timer beside the change handler; a slow reconcile must not let the timer
    report the new generation (tests and users take observedGeneration as "applied")."""
    reconcile = handlers.reconcile

    def slow(body: Any, patch: Any, logger: Any, **kw: Any) -> Any:
        if body["metadata"].get("generation") == 2:
            time.sleep(1.0)  # several status-timer periods (0.3 s here)
        return reconcile(body, patch, logger, **kw)

    monkeypatch.setattr(handlers, "reconcile", slow)
    await cluster.create_pool("p1", {"replicas": 1})
    await settled(cluster)
    assert cluster.get(PDB, "p1") is not None
    await cluster.patch_pool_spec("p1", {"podDisruptionBudget": {"enabled": False}})
    await settled(cluster, generation=2)
    assert cluster.get(PDB, "p1") is None


@pytest.mark.asyncio
async def test_status_follows_the_statefulset(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 3})
    await settled(cluster)
    sts_url = f"/apis/apps/v1/namespaces/{NS}/statefulsets/p1"
    # Play the StatefulSet controller: one pod ready, then all.
    await cluster.patch(
        sts_url, {"status": {"replicas": 3, "readyReplicas": 1, "updatedReplicas": 3, "currentReplicas": 3}}
    )
    pool = await cluster.wait_for(
        lambda: (p := cluster.get(POOLS, "p1"))["status"]["readyReplicas"] == 1 and p
    )
    assert pool["status"]["phase"] == "Degraded"
    assert condition(pool, "Available")["status"] == "True"
    assert condition(pool, "Degraded")["status"] == "True"
    await cluster.patch(sts_url, {"status": {"readyReplicas": 3}})
    await cluster.patch(  # and the Deployment controller: the lookup service rebuilt its index
        f"/apis/apps/v1/namespaces/{NS}/deployments/p1-lookup",
        {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}},
    )
    pool = await cluster.wait_for(
        lambda: (p := cluster.get(POOLS, "p1"))["status"]["phase"] == "Running" and p
    )
    assert pool["status"]["replicas"] == 3 and pool["status"]["readyReplicas"] == 3
    assert condition(pool, "Degraded")["status"] == "False"
    assert condition(pool, "Progressing")["status"] == "False"


@pytest.mark.asyncio
async def test_pools_carry_no_finalizer_and_delete_without_the_operator(cluster: Cluster) -> None:
    """Children go with their pool by garbage collection (owner references), so a pool needs no
    finalizer: deleting it, its namespace, or `helm uninstall` (operator first) never hangs."""
    created = await cluster.create_pool("p1", {"replicas": 1, "networkPolicy": {"enabled": True}})
    await settled(cluster)
    await asyncio.sleep(3 * handlers.STATUS_INTERVAL)  # the daemon has run too
    assert cluster.get(POOLS, "p1")["metadata"].get("finalizers", []) == []
    uid = created["metadata"]["uid"]
    for resource, name in [*CHILDREN, ("networking.k8s.io/v1/networkpolicies", "p1")]:
        (ref,) = cluster.get(resource, name)["metadata"]["ownerReferences"]
        assert ref["uid"] == uid and ref["controller"] is True and ref["blockOwnerDeletion"] is True
    await cluster.stop_operator()
    await cluster.delete_pool("p1")
    assert cluster.get(POOLS, "p1") is None


@pytest.mark.asyncio
async def test_the_finalizer_of_older_versions_is_removed(cluster: Cluster) -> None:
    """Pools created by an operator that kept a finalizer lose it, so they too delete without it."""
    await cluster.create_pool("p1", {"replicas": 1}, finalizers=["kvpool.io/operator", "example.com/keep"])
    await cluster.wait_for(
        lambda: cluster.get(POOLS, "p1")["metadata"].get("finalizers") == ["example.com/keep"],
        message="our finalizer removed, others kept",
    )
    await settled(cluster)


def test_no_handler_asks_kopf_for_a_finalizer() -> None:
    registry = kopf.get_default_registry()
    handlers_ = [*registry._spawning.get_all_handlers(), *registry._changing.get_all_handlers()]
    assert {h.id for h in handlers_} >= {"maintain_pool", "on_change"}
    assert [h.id for h in handlers_ if h.requires_finalizer] == []


@pytest.mark.asyncio
async def test_deleted_and_edited_children_come_back(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 2})
    await settled(cluster)
    port = cluster.get(SVC, "p1")["spec"]["ports"]
    for resource, name in [(CM, "p1-kvpool"), (SVC, "p1-nodes"), (STS, "p1")]:
        group = "api/v1" if resource.startswith("v1/") else f"apis/{resource.rsplit('/', 1)[0]}"
        await cluster.delete(f"/{group}/namespaces/{NS}/{resource.rsplit('/', 1)[1]}/{name}")
        assert cluster.get(resource, name) is None
    edited = [{**port[0], "port": 9999}, *port[1:]]
    await cluster.patch(f"/api/v1/namespaces/{NS}/services/p1", {"spec": {"ports": edited}})
    for resource, name in [(CM, "p1-kvpool"), (SVC, "p1-nodes"), (STS, "p1")]:
        await cluster.wait_for(
            lambda r=resource, n=name: cluster.get(r, n),
            timeout=5 * handlers.STATUS_INTERVAL + 2,
            message=f"{resource} {name} recreated",
        )
    await cluster.wait_for(
        lambda: cluster.get(SVC, "p1")["spec"]["ports"] == port, message="the Service's ports restored"
    )
    assert cluster.get(STS, "p1")["spec"]["replicas"] == 2


@pytest.mark.asyncio
async def test_a_pass_over_an_unchanged_pool_only_reads_each_child_once(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 2})
    await settled(cluster)
    await asyncio.sleep(3 * handlers.STATUS_INTERVAL)  # the first passes may still report progress
    mark = len(cluster.requests())
    await asyncio.sleep(8 * handlers.STATUS_INTERVAL)
    requests = cluster.requests()[mark:]
    ours = [r for r in requests if r.resource is not None and r.resource.plural not in ("events",)]
    writes = [f"{r.method} {r.url.path}" for r in ours if r.action != kmock.action.FETCH]
    writes = [w for w in writes if not w.startswith("GET")]  # LIST/WATCH by kopf are reads too
    assert writes == []
    gets = collections.Counter((r.resource.plural, r.name) for r in ours if r.action == kmock.action.FETCH)
    # One GET per child and pass, none of the pool (the window may cut a pass in two).
    assert set(gets) == {
        ("configmaps", "p1-kvpool"), ("services", "p1-nodes"), ("services", "p1"),
        ("services", "p1-lookup"), ("statefulsets", "p1"), ("deployments", "p1-lookup"),
        ("poddisruptionbudgets", "p1"),
    }  # fmt: skip
    passes = gets["configmaps", "p1-kvpool"]
    assert passes >= 3 and all(abs(n - passes) <= 1 for n in gets.values()), gets


@pytest.mark.asyncio
async def test_a_disk_the_api_server_rewrites_stays_valid_and_scalable(cluster: Cluster) -> None:
    """The API server stores `1024Gi` as `1Ti` and `10240Mi` as `10Gi`: no Invalid pool, no rewrite."""
    await cluster.create_pool("p1", {"replicas": 2, "memory": "8GiB", "disk": {"size": "1024Gi"}})
    await settled(cluster)
    sts = cluster.get(STS, "p1")
    claims = sts["spec"]["volumeClaimTemplates"]
    claims[0]["spec"]["resources"]["requests"]["storage"] = "1Ti"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["requests"]["memory"] = container["resources"]["limits"]["memory"] = str(
        8 * 2**30 + (256 + 256 + 128) * 2**20
    )
    await cluster.patch(
        f"/apis/apps/v1/namespaces/{NS}/statefulsets/p1",
        {"spec": {"volumeClaimTemplates": claims, "template": sts["spec"]["template"]}},
    )
    versions = cluster.versions(STS, "p1")
    await asyncio.sleep(5 * handlers.STATUS_INTERVAL)
    pool = cluster.get(POOLS, "p1")
    assert pool["status"]["phase"] != "Invalid", condition(pool, "ConfigValid")
    assert cluster.versions(STS, "p1") == versions  # no write: same quantities, other spelling
    await cluster.patch_pool_spec("p1", {"replicas": 3})
    await settled(cluster, generation=2)
    assert cluster.get(STS, "p1")["spec"]["replicas"] == 3
    assert condition(cluster.get(POOLS, "p1"), "ConfigValid")["status"] == "True"


@pytest.mark.asyncio
async def test_an_operator_upgrade_keeps_the_image_a_pool_was_created_with(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "DEFAULT_IMAGE", "registry.example/kvpool:1.0")
    await cluster.create_pool("p1", {"replicas": 1})
    await settled(cluster)

    def image() -> str:
        return cluster.get(STS, "p1")["spec"]["template"]["spec"]["containers"][0]["image"]

    assert image() == "registry.example/kvpool:1.0"
    pool = cluster.get(POOLS, "p1")
    assert pool["metadata"]["annotations"][settings.PINNED_IMAGE] == "registry.example/kvpool:1.0"
    # The next operator version defaults to another image; an update and the passes keep the pin.
    monkeypatch.setattr(settings, "DEFAULT_IMAGE", "registry.example/kvpool:2.0")
    await cluster.patch_pool_spec("p1", {"replicas": 2})
    await settled(cluster, generation=2)
    await asyncio.sleep(3 * handlers.STATUS_INTERVAL)
    assert image() == "registry.example/kvpool:1.0"
    # Removing the pin moves the pool to the operator's current default.
    annotations = {settings.PINNED_IMAGE: None}
    await cluster.patch(
        f"/apis/kvpool.io/v1alpha1/namespaces/{NS}/kvcachepools/p1",
        {"metadata": {"annotations": annotations}},
    )
    await cluster.wait_for(lambda: image() == "registry.example/kvpool:2.0", message="the new default image")
    pinned = cluster.get(POOLS, "p1")["metadata"]["annotations"][settings.PINNED_IMAGE]
    assert pinned == "registry.example/kvpool:2.0"


@pytest.mark.parametrize("service_monitors", [True])
@pytest.mark.asyncio
async def test_service_monitor_only_where_served_and_rbac_covers_every_call(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 1, "metrics": {"serviceMonitor": {"enabled": True}}})
    await settled(cluster)
    sm = cluster.get("monitoring.coreos.com/v1/servicemonitors", "p1")
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    await cluster.patch_pool_spec(
        "p1", {"metrics": {"serviceMonitor": {"enabled": False}}, "podDisruptionBudget": {"enabled": False}}
    )
    await settled(cluster, generation=2)
    assert cluster.get("monitoring.coreos.com/v1/servicemonitors", "p1") is None
    assert cluster.get(PDB, "p1") is None
    await cluster.delete_pool("p1")
    await cluster.wait_for(lambda: cluster.get(POOLS, "p1") is None)
    # Every request the operator made (kopf's own included) is allowed by the RBAC rules.
    calls = {
        (
            r.resource.group,
            r.resource.plural,
            r.subresource,
            rbac.verb(r.action.value, bool(r.params.get("watch"))),
        )
        for r in cluster.requests()
        if r.resource is not None and r.resource.plural
        if r.headers.get("User-Agent", "").startswith(("kopf", "OpenAPI"))
    }
    assert {("apps", "statefulsets", None, "create"), ("kvpool.io", "kvcachepools", None, "watch")} <= calls
    assert ("monitoring.coreos.com", "servicemonitors", None, "delete") in calls
    uncovered = {call for call in calls if not rbac.allows(*call)}
    assert uncovered == set()


@pytest.mark.asyncio
async def test_a_child_the_api_server_refuses_reaches_the_status(cluster: Cluster) -> None:
    refusal = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
               "message": 'poddisruptionbudgets.policy is forbidden: User "kvpool" cannot create resource'}  # fmt: skip
    cluster.emulator["post", f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets"] << 403 << refusal
    await cluster.create_pool("p1", {"replicas": 2, "memory": "1GiB"})
    pool = await cluster.wait_for(
        lambda: (p := cluster.get(POOLS, "p1")) and condition(p, "Degraded") and p, message="Degraded"
    )
    cond = condition(pool, "Degraded")
    assert cond["status"] == "True" and cond["reason"] == "ApplyFailed" and cond["lastTransitionTime"]
    assert "PodDisruptionBudget/p1" in cond["message"] and "403" in cond["message"]
    assert "cannot create resource" in cond["message"]
    assert pool["status"]["phase"] == "Degraded" and "observedGeneration" not in pool["status"]
    assert cluster.get(STS, "p1") is not None  # the other children were applied
