"""Pure builders: every rendered child is a valid Kubernetes 1.35 object (strict), sized and wired right."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from kvpool.operator import builders, kube, sizing, status
from kvpool.operator.builders import common, statefulset
from kvpool.operator.settings import InvalidSpec, parse

K8S = "1.35.0"
OWNER = {"metadata": {"name": "pool", "namespace": "ns", "uid": "0b5e-uid"}}
FULL: dict[str, Any] = {
    "replicas": 4,
    "image": "registry.example/kvpool:1.2.3",
    "imagePullSecrets": [{"name": "regcred"}],
    "memory": "8GiB",
    "resources": {"limits": {"cpu": "4"}, "requests": {"cpu": "1"}},
    "disk": {"size": "100Gi", "storageClassName": "ssd", "reclaimPolicy": "Delete"},
    "tiers": {
        "redis": {"url": "rediss://r:6380/0", "credentialsSecret": {"name": "r", "usernameKey": "user"}},
        "s3": {"url": "s3://bucket/prefix", "endpoint": "http://minio:9000", "credentialsSecret": {"name": "s3"}},
    },
    "chunkSize": 512,
    "replicationFactor": 2,
    "auth": {"tokenSecret": {"name": "tok"}},
    "tls": {"secretName": "tls"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "networkPolicy": {"enabled": True, "clientPodSelector": {"matchLabels": {"app": "vllm"}}},
    "scheduling": {
        "nodeSelector": {"pool": "cache"},
        "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
        "priorityClassName": "high",
    },
}  # fmt: skip


def render(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    s = parse("pool", "ns", spec)
    return {
        f"{o['kind']}/{o['metadata']['name']}": o for o in builders.desired(OWNER, s, service_monitors=True)
    }


@pytest.mark.parametrize(
    "spec", [{}, FULL, {"replicas": 0, "lookup": {"replicas": 0}, "podDisruptionBudget": {"enabled": False}}]
)
def test_every_child_validates_strictly(spec: dict[str, Any]) -> None:
    objs = render(spec)
    for key, obj in objs.items():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "0b5e-uid", key
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kvpool", key
        if obj["apiVersion"] != common.SERVICE_MONITOR_API_VERSION:  # not a Kubernetes kind
            kubernetes_validate.validate(obj, K8S, strict=True)


def test_full_spec_wires_tiers_secrets_disk_and_scheduling() -> None:
    objs = render(FULL)
    assert set(objs) == {
        "ConfigMap/pool-kvpool", "Service/pool-nodes", "Service/pool", "StatefulSet/pool",
        "PodDisruptionBudget/pool", "NetworkPolicy/pool", "ServiceMonitor/pool",
        "Deployment/pool-lookup", "Service/pool-lookup",
    }  # fmt: skip
    sts = objs["StatefulSet/pool"]
    pod = sts["spec"]["template"]["spec"]
    node = pod["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in node["env"]}
    assert env["KVPOOL_REDIS_USERNAME"] == {"secretKeyRef": {"name": "r", "key": "user"}}
    assert env["KVPOOL_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "r", "key": "password"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3", "key": "secretAccessKey"}}
    assert env["KVPOOL_AUTH_TOKEN_FILE"] == "/etc/kvpool/auth/token"
    assert env["KVPOOL_TLS_CERT_FILE"] == "/etc/kvpool/tls/tls.crt"
    # Identity from the downward API: the pod name (stable) for placement; with TLS the pod's DNS
    # name (a certificate can carry it; a pod IP it cannot) is where clients dial it.
    assert env["KVPOOL_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["KVPOOL_ADVERTISE_HOST"] == "$(KVPOOL_NODE_ID).pool-nodes.ns.svc"
    assert "KVPOOL_POD_IP" not in env
    assert node["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    # Stopping: a preStop pause, then the handoff deadline, then a clean shutdown.
    assert node["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 15
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert (
        claim["spec"]["storageClassName"] == "ssd"
        and claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    )
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    assert pod["nodeSelector"] == {"pool": "cache"} and pod["priorityClassName"] == "high"
    assert node["resources"]["limits"]["cpu"] == "4" and node["resources"]["requests"]["cpu"] == "1"
    data = objs["ConfigMap/pool-kvpool"]["data"]
    assert data["KVPOOL_CHUNK_SIZE"] == "512" and data["KVPOOL_REPLICATION_FACTOR"] == "2"
    assert data["KVPOOL_PEERS"] == "pool-nodes.ns.svc"
    # TLS: clients get a grpcs:// URL and the path where the CA (by Secret reference) is mounted.
    assert (
        data["KVPOOL_URL"] == "grpcs://pool.ns.svc:7400"
        and data["KVPOOL_TLS_CA_FILE"] == "/etc/kvpool/tls/ca.crt"
    )
    assert data["KVPOOL_DISK_SIZE"] == str(int(100 * 1024**3 * 0.95) - 64 * 1024**2)
    assert (
        data["KVPOOL_S3_ENDPOINT"] == "http://minio:9000" and data["KVPOOL_REDIS_PREFIX"] == "kvpool:ns:pool:"
    )
    monitor = objs["ServiceMonitor/pool"]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    # It scrapes through the headless Service only: two Services select the nodes, each is scraped once.
    scraped = [
        key for key, o in objs.items() if o["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()
    ]  # fmt: skip
    assert scraped == ["Service/pool-nodes"]


def test_memory_limit_is_cache_plus_overhead_and_derivable_from_the_limit() -> None:
    s = parse("p", "ns", {"memory": "4GiB"})
    assert s.container_memory == 4096 * 2**20 + 256 * 2**20 + 4 * 64 * 2**20 + 64 * 2**20
    # Given only the limit, the cache is the largest that fits in it.
    d = parse("p", "ns", {"resources": {"limits": {"memory": "10Gi"}}})
    assert d.container_memory == 10 * 2**30
    assert sizing.container_memory(d.cache_bytes, d.max_value_size) <= 10 * 2**30
    assert sizing.container_memory(d.cache_bytes + 2**20, d.max_value_size) > 10 * 2**30


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"memory": "4GiB", "resources": {"limits": {"memory": "4Gi"}}}, "below spec.memory"),
        ({"resources": {"limits": {"memory": "300Mi"}}}, "leaves no room"),
        ({"chunkSize": 100}, "multiple of 16"),
        # Tier URLs are checked by the node's own parsers: what a node refuses, the pool refuses.
        ({"tiers": {"s3": {"url": "http://bucket"}}}, r"spec.tiers.s3.url: .*must start with s3://"),
        ({"tiers": {"s3": {"url": "s3://my..bucket/p"}}}, "spec.tiers.s3.url: .*not a valid S3 bucket"),
        ({"tiers": {"s3": {"url": "s3://bkt/p", "endpoint": "ftp://x"}}}, "spec.tiers.s3.endpoint"),
        ({"tiers": {"redis": {"url": "http://cache:6379"}}}, "spec.tiers.redis.url: .*scheme"),
        ({"tiers": {"redis": {"url": "redis://cache:6379/db0"}}}, "database 'db0' must be a number"),
        ({"memory": "4GB!"}, "spec.memory"),
        ({"eviction": {"policy": "FIFO"}}, "spec.eviction.policy"),
        ({"lookup": {"replicas": 2}}, r"spec\.lookup\.replicas .* 0 to 1"),
        ({"handoffDeadlineSeconds": 7200}, "handoffDeadlineSeconds"),
        ({"eviction": {"highWatermark": 0.5, "lowWatermark": 0.6}}, "lowWatermark < highWatermark"),
        ({"disk": {"size": "10Mi"}}, "too small"),
        ({"resources": {"limits": {"cpu": "1"}, "requests": {"cpu": "2"}}}, "exceeds"),
    ],
)
def test_invalid_specs_say_what_to_fix(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        parse("p", "ns", spec)


def test_disk_change_on_a_running_pool_is_refused() -> None:
    running = statefulset.build(OWNER, parse("pool", "ns", {"disk": {"size": "10Gi"}}), "h")
    assert (
        statefulset.immutable_change(
            running, statefulset.build(OWNER, parse("pool", "ns", {"disk": {"size": "10Gi"}}), "h")
        )
        is None
    )
    assert "cannot change" in statefulset.immutable_change(
        running, statefulset.build(OWNER, parse("pool", "ns", {"disk": {"size": "20Gi"}}), "h")
    )
    assert "cannot change" in statefulset.immutable_change(
        running, statefulset.build(OWNER, parse("pool", "ns", {}), "h")
    )


def test_spec_change_changes_the_pod_template_hash() -> None:
    a = render({"memory": "1GiB"})["StatefulSet/pool"]["spec"]["template"]["metadata"]["annotations"]
    b = render({"memory": "2GiB"})["StatefulSet/pool"]["spec"]["template"]["metadata"]["annotations"]
    assert a["kvpool.io/config-hash"] != b["kvpool.io/config-hash"]
    assert render({"memory": "1GiB"})["StatefulSet/pool"] == render({"memory": "1GiB"})["StatefulSet/pool"]


def _sts(replicas: int, ready: int, updated: int) -> dict[str, Any]:
    return {"metadata": {"generation": 2}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": 2, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                       "currentReplicas": replicas}}  # fmt: skip


@pytest.mark.parametrize(
    ("sts", "phase", "available", "degraded"),
    [
        (None, "Pending", False, False),
        (_sts(3, 0, 0), "Pending", False, False),
        (_sts(3, 1, 1), "Progressing", True, False),
        (_sts(3, 2, 3), "Degraded", True, True),
        (_sts(3, 3, 3), "Running", True, False),
    ],
)
def test_phase_and_conditions(
    sts: dict[str, Any] | None, phase: str, available: bool, degraded: bool
) -> None:
    body = {"metadata": {"name": "pool", "generation": 7}, "spec": {}}
    s = parse("pool", "ns", {"replicas": 3, "lookup": {"replicas": 0}})
    st = status.compute(body, s, None, sts, None, at="2026-01-01T00:00:00Z")
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == phase and st["observedGeneration"] == 7
    assert conds["Available"]["status"] == str(available)
    assert conds["Degraded"]["status"] == str(degraded)
    assert all(c["reason"] and c["message"] for c in conds.values())


def test_condition_transition_time_moves_only_on_flips() -> None:
    body: dict[str, Any] = {"metadata": {"name": "pool", "generation": 1}}
    s = parse("pool", "ns", {"replicas": 1})
    first = status.compute(body, s, None, None, None, at="T1")
    body["status"] = first
    again = status.compute(body, s, None, None, None, at="T2")
    assert [c["lastTransitionTime"] for c in again["conditions"]] == ["T1"] * 4
    flipped = status.compute(body, None, "bad", None, None, at="T3")
    cond = {c["type"]: c for c in flipped["conditions"]}["ConfigValid"]
    assert (cond["status"], cond["lastTransitionTime"], cond["message"]) == ("False", "T3", "bad")


def test_contains_is_subset_with_exact_lists() -> None:
    assert kube.contains({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}}, {"b": {"c": [1, {"d": 2}]}})
    assert not kube.contains({"b": {"c": [1]}}, {"b": {"c": [1, 2]}})
    assert not kube.contains({"a": {"x": 1}}, {"a": {"x": 2}})


def _as_stored(value: Any) -> Any:
    """What the API server gives back: empty maps and lists are not stored (`annotations: {}`)."""
    if isinstance(value, dict):
        return {k: _as_stored(v) for k, v in value.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [_as_stored(v) for v in value]
    return value


@pytest.mark.parametrize("spec", [{"replicas": 1}, FULL], ids=["minimal", "full"])
def test_children_as_the_api_server_stores_them_need_no_write(spec: dict[str, Any]) -> None:
    """Otherwise every status pass rewrites them (the lookup's empty template annotations did)."""
    assert kube.contains({"a": 1}, {"a": 1, "b": {}, "c": []})
    assert not kube.contains({"a": 1}, {"b": {"x": 1}})
    s = parse("pool", "ns", spec)
    for obj in builders.desired(OWNER, s, service_monitors=True):
        stamped = kube.stamped(obj)
        assert kube.contains(_as_stored(stamped), stamped), f"{obj['kind']}/{obj['metadata']['name']}"


def _pod(objs: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    return objs[key]["spec"]["template"]["spec"]


@pytest.mark.parametrize("key", ["StatefulSet/pool", "Deployment/pool-lookup"])
def test_our_pods_can_read_their_secrets(key: str) -> None:
    """The kubelet writes Secret files as root; only fsGroup makes them group 10001, and then the
    group bits (0440) are what let uid 10001 read the token and tls.key."""
    pod = _pod(render(FULL), key)
    security = pod["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == 10001
    assert security["fsGroupChangePolicy"] == "OnRootMismatch"  # no chown of a full disk on each start
    secrets = [v["secret"] for v in pod["volumes"] if "secret" in v]
    assert {s["secretName"] for s in secrets} == {"tok", "tls"}
    assert all(s["defaultMode"] == 0o440 for s in secrets)


def test_tmp_is_capped_and_pre_stop_needs_no_feature_gate() -> None:
    objs = render({})
    for key in ("StatefulSet/pool", "Deployment/pool-lookup"):
        tmp = next(v for v in _pod(objs, key)["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"]["sizeLimit"], key
    node = _pod(objs, "StatefulSet/pool")["containers"][0]
    assert "sleep" not in node["lifecycle"]["preStop"]  # the sleep action is off by default on 1.29
    assert node["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_nodes_get_a_default_cpu_request() -> None:
    assert _pod(render({}), "StatefulSet/pool")["containers"][0]["resources"]["requests"]["cpu"] == "250m"
    limited = render({"resources": {"limits": {"cpu": "2"}}})
    assert _pod(limited, "StatefulSet/pool")["containers"][0]["resources"]["requests"]["cpu"] == "2"


def test_memory_change_rolls_the_nodes_but_not_the_lookup() -> None:
    """The lookup reads nothing from the ConfigMap: a tier or memory change must not restart the index."""
    a, b = render({"memory": "1GiB"}), render({"memory": "2GiB"})
    assert a["StatefulSet/pool"]["spec"]["template"] != b["StatefulSet/pool"]["spec"]["template"]
    assert a["Deployment/pool-lookup"]["spec"]["template"] == b["Deployment/pool-lookup"]["spec"]["template"]
    tiers = render({"memory": "1GiB", "tiers": {"redis": {"url": "redis://r:6379/0"}}})
    lookup = a["Deployment/pool-lookup"]["spec"]["template"]
    assert tiers["Deployment/pool-lookup"]["spec"]["template"] == lookup


def test_without_tls_nodes_advertise_their_pod_ip() -> None:
    env = {e["name"]: e for e in _pod(render({}), "StatefulSet/pool")["containers"][0]["env"]}
    assert env["KVPOOL_ADVERTISE_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_tls_nodes_advertise_a_name_their_certificate_carries() -> None:
    """With TLS, clients dial what a node advertises and verify that name: a DNS name under the
    headless Service (the `$(VAR)` the kubelet expands comes earlier in the env)."""
    s = parse("pool", "ns", FULL)
    names = [e["name"] for e in statefulset.pod_env(s)]
    assert names.index("KVPOOL_NODE_ID") < names.index("KVPOOL_ADVERTISE_HOST")
    env = statefulset.node_environment(s, {}, pod_name="pool-2", pod_ip="10.0.0.9")
    assert env["KVPOOL_ADVERTISE_HOST"] == "pool-2.pool-nodes.ns.svc"
    assert common.endpoints(s)["nodes"][2] == "pool-2.pool-nodes.ns.svc:7400"
    sans = common.tls_dns_names(s)
    assert sans == ["*.pool-nodes.ns.svc", "pool-nodes.ns.svc", "pool.ns.svc", "pool-lookup.ns.svc"]
    objs = render(FULL)
    tls = objs["ServiceMonitor/pool"]["spec"]["endpoints"][0]["tlsConfig"]
    assert tls["serverName"] in sans  # Prometheus dials pod IPs; it must verify some name the cert has
    assert objs["ConfigMap/pool-kvpool"]["data"]["KVPOOL_URL"].split("//")[1].split(":")[0] in sans


def test_network_policy_admits_prometheus_to_the_metrics_port_only() -> None:
    rules = render(FULL)["NetworkPolicy/pool"]["spec"]["ingress"]
    assert rules[1:] == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"protocol": "TCP", "port": 7401}],
        }
    ]
    chosen = {"matchLabels": {"team": "observability"}}
    spec = {**FULL, "networkPolicy": {**FULL["networkPolicy"], "metricsNamespaceSelector": chosen}}
    assert render(spec)["NetworkPolicy/pool"]["spec"]["ingress"][-1]["from"] == [
        {"namespaceSelector": chosen}
    ]
    no_monitor = {**FULL, "metrics": {"serviceMonitor": {"enabled": False}}}
    assert len(render(no_monitor)["NetworkPolicy/pool"]["spec"]["ingress"]) == 1


def test_the_lookup_query_channel_is_served_and_published() -> None:
    """Clients learn the query channel's port from the lookup's Hello and dial it at the Service's
    address: the Deployment must serve that fixed port and the Service and NetworkPolicy carry it."""
    objs = render({})
    container = _pod(objs, "Deployment/pool-lookup")["containers"][0]
    args = container["args"]
    port = int(args[args.index("--query-port") + 1])
    assert {"name": "query", "containerPort": port} in [
        {k: p[k] for k in ("name", "containerPort")} for p in container["ports"]
    ]
    assert port in [p["port"] for p in objs["Service/pool-lookup"]["spec"]["ports"]]
    policy = next(o for k, o in render(FULL).items() if k.startswith("NetworkPolicy/"))
    assert port in [p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])]
