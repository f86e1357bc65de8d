"""`kvpool operator` as its own process, as in a Deployment: kubeconfig login, health port, reconcile.

Started the way docs/operator.md tells a new user to (`kvpool operator --all-namespaces`, one
replica, no kopf peering CRDs installed): it must run standalone and say what it is doing.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys

import aiohttp
import kmock
import kubernetes_validate
import pytest
import yaml

from kvpool.cli.devtools.local_servers import free_port

from .conftest import NS, ROOT, Cluster, _declare_resources


def test_peering_crds_validate() -> None:
    for doc in yaml.safe_load_all((ROOT / "crds" / "kopf-peerings.yaml").read_text()):
        kubernetes_validate.validate(doc, "1.35.0", strict=True)


@pytest.mark.parametrize(
    ("peering_installed", "says"),
    [
        (False, "No kopf.dev peering CRDs: running standalone"),
        (True, "Peering through ClusterKopfPeering 'kvpool-operator'"),
    ],
)
@pytest.mark.asyncio
async def test_operator_command_reconciles_and_serves_health(
    tmp_path: pathlib.Path, peering_installed: bool, says: str
) -> None:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        _declare_resources(emulator, service_monitors=False)
        url = str(server.url).rstrip("/")
        if peering_installed:  # the CRDs of crds/kopf-peerings.yaml and the peering object
            for plural, kind, namespaced in (
                ("kopfpeerings", "KopfPeering", True),
                ("clusterkopfpeerings", "ClusterKopfPeering", False),
            ):
                emulator.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs={"get", "list", "watch", "patch", "create"}
                )  # fmt: skip
            async with aiohttp.ClientSession(base_url=url) as session:
                peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                           "metadata": {"name": "kvpool-operator", "resourceVersion": "1"}}  # fmt: skip
                async with session.post("/apis/kopf.dev/v1/clusterkopfpeerings", json=peering) as r:
                    assert r.status < 300, await r.text()
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "k",
            "clusters": [{"name": "k", "cluster": {"server": url}}],
            "users": [{"name": "k", "user": {"token": "t"}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "k"}}],
        }))  # fmt: skip
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        for name in ("KUBERNETES_SERVICE_HOST", "KVPOOL_NAMESPACE", "KVPOOL_STANDALONE"):
            env.pop(name, None)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvpool.cli.main",
                "operator",
                "--all-namespaces",
                "--health-port",
                str(port),
                "--webhook-port",
                "0",
                "--metrics-port",
                "0",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            async with aiohttp.ClientSession(base_url=url) as session:
                cluster = Cluster(emulator, session)
                await cluster.wait_for(
                    lambda: any(r.action == kmock.action.WATCH and r.resource.plural == "kvcachepools" for r in cluster.requests() if r.resource),
                    timeout=30,
                    message="the operator process to watch pools",
                )  # fmt: skip
                await cluster.create_pool("p1", {"replicas": 1})
                sts = await cluster.wait_for(lambda: cluster.get("apps/v1/statefulsets", "p1"), timeout=15)
                assert sts["spec"]["replicas"] == 1
            async with aiohttp.ClientSession() as health, health.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
        finally:
            proc.terminate()
            try:
                out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        text = out.decode(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert "watching KVCachePools in all namespaces" in text, text[-3000:]
        assert says in text, text[-3000:]
        assert f"Reconciled {NS}/p1" in text, text[-3000:]
