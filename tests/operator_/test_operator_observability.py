"""What `kubectl` shows of a pool besides its children, with the real operator against kmock's
emulator: Normal events for scale and rollout, the hit ratio and usage read from a real node,
and the reconcile metrics moving (snapshot differences: the registry is the process's)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import free_port, kvpool_up
from kvpool.operator import handlers, metrics, scrape

from .conftest import NS, POOLS, ROOT, Cluster, _declare_resources


def normal_events(cluster: Cluster) -> list[tuple[str, str, str]]:
    """(type, reason, message) of every Event the operator posted about pool p1."""
    out = []
    for r in cluster.requests():
        if r.resource is not None and r.resource.plural == "events" and r.action == kmock.action.CREATE:
            body: dict[str, Any] = r.data
            if (body.get("involvedObject") or body.get("regarding") or {}).get("name") == "p1":
                out.append((body.get("type"), body.get("reason"), body.get("message") or body.get("note")))
    return out


async def settled(cluster: Cluster, generation: int) -> dict[str, Any]:
    return await cluster.wait_for(
        lambda: (
            (p := cluster.get(POOLS, "p1"))
            and (p.get("status") or {}).get("observedGeneration") == generation
            and p
        ),
        message=f"status of generation {generation}",
    )


async def play_controllers(cluster: Cluster, replicas: int) -> None:
    """What the StatefulSet and Deployment controllers would write once every pod is up."""
    ready = {
        "replicas": replicas,
        "readyReplicas": replicas,
        "updatedReplicas": replicas,
        "currentReplicas": replicas,
    }
    await cluster.patch(f"/apis/apps/v1/namespaces/{NS}/statefulsets/p1", {"status": ready})
    await cluster.patch(
        f"/apis/apps/v1/namespaces/{NS}/deployments/p1-lookup",
        {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1}},
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.asyncio
async def test_scale_rollout_and_rolled_out_post_normal_events(cluster: Cluster) -> None:
    await cluster.create_pool("p1", {"replicas": 2, "memory": "1GiB"})
    await settled(cluster, 1)
    assert normal_events(cluster) == []  # creating a pool is neither a scale nor a rollout
    await play_controllers(cluster, 2)
    await cluster.wait_for(
        lambda: ("Normal", "RolledOut", "2/2 cache nodes updated and ready") in normal_events(cluster),
        message="a RolledOut event",
    )
    # `kubectl scale kvp/p1 --replicas=3`: the scale subresource (the server bumps the generation).
    cluster.generations["p1"] += 1
    await cluster.patch(
        f"/apis/kvpool.io/v1alpha1/namespaces/{NS}/kvcachepools/p1/scale",
        {"metadata": {"generation": 2}, "spec": {"replicas": 3}},
    )
    await settled(cluster, 2)
    await cluster.wait_for(
        lambda: ("Normal", "Scaled", "cache nodes scaled from 2 to 3") in normal_events(cluster),
        message="a Scaled event",
    )
    assert "RollingOut" not in [reason for _, reason, _ in normal_events(cluster)]  # scaling rolls nothing
    await cluster.patch_pool_spec("p1", {"memory": "2GiB"})
    await settled(cluster, 3)
    (rolling,) = await cluster.wait_for(
        lambda: [e for e in normal_events(cluster) if e[1] == "RollingOut"], message="a RollingOut event"
    )
    assert rolling[0] == "Normal" and rolling[2].startswith("configuration changed: rolling 3 cache nodes")
    await asyncio.sleep(3 * handlers.STATUS_INTERVAL)
    reasons = [reason for _, reason, _ in normal_events(cluster)]
    assert reasons.count("RolledOut") == 1 and reasons.count("Scaled") == 1, reasons  # each once
    assert {t for t, _, _ in normal_events(cluster)} == {"Normal"}


@pytest.mark.asyncio
async def test_the_status_shows_hit_ratio_and_usage_of_the_nodes_that_answer(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real node answers for p1-0; nothing listens for p1-1: its figures are left out, the
    reconcile and the status passes go on."""
    http_port = free_port()
    with (
        kvpool_up("--http-port", str(http_port), "--memory", "256MiB") as (_proc, url),
        Client(url) as client,
    ):
        for i in range(4):
            client.put(f"k{i}".encode(), bytes(4096))
        assert len(client.get_many([b"k0", b"k1", b"k2", b"k3", b"x", b"y", b"z", b"w"])) == 4
        urls = {
            "p1-0": f"http://127.0.0.1:{http_port}/metrics",
            "p1-1": f"http://127.0.0.1:{free_port()}/metrics",
        }
        monkeypatch.setattr(scrape, "node_urls", lambda s: urls if s.name == "p1" else {})
        monkeypatch.setattr(scrape, "STATS_TIMEOUT", 2.0)  # conftest turns reading off
        await cluster.create_pool("p1", {"replicas": 2})
        pool = await cluster.wait_for(
            lambda: (
                (p := cluster.get(POOLS, "p1")) and (p.get("status") or {}).get("nodesReporting") == 1 and p
            ),
            message="the node's figures in the status",
        )
        st = pool["status"]
        assert st["hitRatio"] == "50%" and st["usage"].endswith("/256Mi") and st["observedGeneration"] == 1
        assert st["phase"] == "Pending"  # the status passes went on
        # More hits move the ratio on a later pass.
        for _ in range(3):
            client.get_many([b"k0", b"k1", b"k2", b"k3"])
        await cluster.wait_for(
            lambda: cluster.get(POOLS, "p1")["status"]["hitRatio"] == "80%", message="16 hits of 20"
        )
    # The node is gone: no figures, the pass carries on and says so.
    await cluster.wait_for(
        lambda: cluster.get(POOLS, "p1")["status"]["hitRatio"] == "unknown", message="the node gone"
    )
    st = cluster.get(POOLS, "p1")["status"]
    assert st["usage"] == "unknown" and st["nodesReporting"] == 0


def test_kubectl_get_shows_hit_ratio_and_usage() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "kvcachepools.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Hit Ratio"] == ".status.hitRatio" and columns["Usage"] == ".status.usage"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["hitRatio"]["type"] == status["usage"]["type"] == "string"
    assert status["nodesReporting"]["type"] == "integer"


@pytest.mark.asyncio
async def test_reconciles_are_counted_and_timed(cluster: Cluster) -> None:
    def snapshot() -> dict[str, float]:
        return {
            "create": sample("kvpool_operator_reconciles_total", handler="create", outcome="applied"),
            "creates": sum(
                sample("kvpool_operator_reconciles_total", handler="create", outcome=o)
                for o in metrics.OUTCOMES
            ),
            "update": sample("kvpool_operator_reconciles_total", handler="update", outcome="applied"),
            "invalid": sample("kvpool_operator_reconciles_total", handler="update", outcome="invalid"),
            "pass": sample("kvpool_operator_reconciles_total", handler="pass", outcome="unchanged"),
            "timed": sample("kvpool_operator_reconcile_seconds_count", handler="create"),
            "seconds": sample("kvpool_operator_reconcile_seconds_sum", handler="create"),
        }

    before = snapshot()
    await cluster.create_pool("p1", {"replicas": 1})
    await settled(cluster, 1)
    await cluster.wait_for(lambda: snapshot()["pass"] >= before["pass"] + 2, message="two status passes")
    await cluster.patch_pool_spec("p1", {"memory": "2GiB"})
    await settled(cluster, 2)
    await cluster.patch_pool_spec("p1", {"chunkSize": 17})
    await settled(cluster, 3)
    after = snapshot()
    moved = {k: after[k] - before[k] for k in before}
    assert moved["create"] == 1 and moved["update"] == 1 and moved["invalid"] == 1
    assert moved["timed"] == moved["creates"] >= 1  # kopf may call the create handler again (unchanged)
    assert moved["seconds"] > 0


@pytest.mark.asyncio
async def test_the_operator_process_serves_its_metrics_without_the_webhook(tmp_path: pathlib.Path) -> None:
    """`kvpool operator --webhook-port 0 --metrics-port N`: /metrics counts the reconcile."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        _declare_resources(emulator, service_monitors=False)
        url = str(server.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "k",
            "clusters": [{"name": "k", "cluster": {"server": url}}],
            "users": [{"name": "k", "user": {"token": "t"}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "k"}}],
        }))  # fmt: skip
        port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "KVPOOL_STATUS_INTERVAL": "0.3",
            "KVPOOL_STATS_TIMEOUT": "1",
        }
        for name in (
            "KUBERNETES_SERVICE_HOST",
            "KVPOOL_NAMESPACE",
            "KVPOOL_STANDALONE",
            "KVPOOL_METRICS_PORT",
        ):
            env.pop(name, None)
        command = [sys.executable, "-P", "-m", "kvpool.cli.main", "operator", "--namespace", NS, "--standalone",
                   "--health-port", "0", "--webhook-port", "0", "--metrics-port", str(port)]  # fmt: skip
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        async def metrics() -> str:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200
                return await r.text()

        try:
            async with aiohttp.ClientSession(base_url=url) as session:
                cluster = Cluster(emulator, session)
                await cluster.wait_for(
                    lambda: any(r.action == kmock.action.WATCH and r.resource.plural == "kvcachepools" for r in cluster.requests() if r.resource),
                    timeout=30,
                    message="the operator process to watch pools",
                )  # fmt: skip
                before = await metrics()
                assert "# TYPE kvpool_operator_reconciles_total counter" in before
                assert 'kvpool_operator_reconciles_total{handler="create",outcome="applied"}' not in before
                await cluster.create_pool("p1", {"replicas": 1})
                await settled(cluster, 1)
                # A pass wrote the node figures ("unknown": no node here), and was counted once it ended.
                await cluster.wait_for(lambda: cluster.get(POOLS, "p1")["status"].get("hitRatio"), timeout=10)
                text = ""
                for _ in range(50):
                    text = await metrics()
                    if 'kvpool_operator_reconciles_total{handler="pass",outcome="unchanged"}' in text:
                        break
                    await asyncio.sleep(0.2)
        finally:
            proc.terminate()
            try:
                out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
    log = out.decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert f"Metrics on :{port}/metrics" in log, log[-3000:]
    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(text)
        for x in family.samples
    }
    creates = {labels: v for (name, labels), v in samples.items()
               if name == "kvpool_operator_reconciles_total" and ("handler", "create") in labels}  # fmt: skip
    assert creates[("handler", "create"), ("outcome", "applied")] == 1
    assert samples["kvpool_operator_reconcile_seconds_count", (("handler", "create"),)] == sum(
        creates.values()
    )
    assert samples["kvpool_operator_reconciles_total", (("handler", "pass"), ("outcome", "unchanged"))] >= 1
