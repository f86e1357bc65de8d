"""`kvpool operator` as its own process, as in a Deployment: kubeconfig login, health port, reconcile."""

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

from kvpool.cli.local_servers import free_port

from .conftest import NS, ROOT, Cluster, _declare_resources


def test_peering_crds_validate() -> None:
    for doc in yaml.safe_load_all((ROOT / "crds" / "kopf-peerings.yaml").read_text()):
        kubernetes_validate.validate(doc, "1.35.0", strict=True)


@pytest.mark.asyncio
async def test_operator_command_reconciles_and_serves_health(tmp_path: pathlib.Path) -> None:
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
            "KVPOOL_NAMESPACE": NS,
            "KVPOOL_STANDALONE": "true",
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvpool.cli.main", "operator", "--health-port", str(port)],
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
        assert b"Traceback" not in out, out.decode(errors="replace")[-3000:]
