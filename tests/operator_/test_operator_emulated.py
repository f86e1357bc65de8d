"""The real operator against kmock's emulator: create, update, invalid spec, scale, status, delete."""

from __future__ import annotations

import time
from typing import Any

import kmock
import pytest

from kvpool.operator import handlers, rbac

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
    assert st["memory"] == "1024Mi" and st["containerMemory"] == "1552Mi"
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
    assert pool["status"]["memory"] == "2048Mi"


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
        == "5120Mi"
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

    def slow(body: Any, patch: Any, logger: Any) -> Any:
        if body["metadata"].get("generation") == 2:
            time.sleep(1.0)  # several status-timer periods (0.3 s here)
        return reconcile(body, patch, logger)

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
async def test_delete_leaves_nothing_owned(cluster: Cluster) -> None:
    created = await cluster.create_pool("p1", {"replicas": 1, "networkPolicy": {"enabled": True}})
    await settled(cluster)
    assert cluster.get("networking.k8s.io/v1/networkpolicies", "p1") is not None
    await cluster.delete_pool("p1")
    await cluster.wait_for(lambda: cluster.get(POOLS, "p1") is None, message="pool gone (finalizer released)")
    uid = created["metadata"]["uid"]
    owned = [
        key for key, obj in cluster.emulator.objects.items()
        if not obj.deleted and any(ref.get("uid") == uid for ref in obj.raw.get("metadata", {}).get("ownerReferences", []))
    ]  # fmt: skip
    assert owned == []


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
