"""The webhook of a running `kvpool operator` process, over real HTTPS, as the API server calls it.

The operator runs against kmock's emulator (which calls no webhooks itself), makes its own
certificate and CA, puts the CA into the MutatingWebhookConfiguration's caBundle, and answers
AdmissionReview v1 requests for every pod shape of tests/webhook/pods; each returned JSON Patch is
applied with a JSON-patch library and the result validated against Kubernetes 1.35, strictly.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import ssl
import subprocess
import sys
import uuid
from typing import Any

import aiohttp
import jsonpatch
import kmock
import pytest
import yaml

from kvpool.cli.devtools.local_servers import free_port
from kvpool.operator.webhook import certs

from ..webhook.shapes import EXPECTED, apply, pod, pool
from .conftest import Cluster, _declare_resources

WEBHOOKS = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def review(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": obj["metadata"].get("namespace", "serving"),
            "operation": "CREATE",
            "object": obj,
            "dryRun": False,
        },
    }


async def admit(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["kind"] == "AdmissionReview" and answer["apiVersion"] == "admission.k8s.io/v1"
    response = answer["response"]
    assert response["uid"] == body["request"]["uid"] and response["allowed"] is True  # fails open
    return response


def ops(response: dict[str, Any]) -> list[dict[str, Any]]:
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


@pytest.mark.asyncio
async def test_operator_webhook_over_https(tmp_path: pathlib.Path) -> None:
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
        async with aiohttp.ClientSession(base_url=url) as api:
            cluster = Cluster(emulator, api)
            await cluster.create_pool("kvpool", pool()["spec"], namespace="serving")
            await cluster.create_pool("kvpool", pool()["spec"], namespace="infra")
            config = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                      "metadata": {"name": "kvpool-webhook", "resourceVersion": "1"},
                      "webhooks": [{"name": "pods.kvpool.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                                    "clientConfig": {"service": {"name": "kvpool-webhook", "namespace": "kvpool-system",
                                                                 "path": "/mutate-pods", "port": 443}}}]}  # fmt: skip
            async with api.post(f"/apis/{WEBHOOKS}", json=config) as r:
                assert r.status < 300, await r.text()

        ports = {name: free_port() for name in ("health", "webhook", "metrics")}
        certs_dir = tmp_path / "certs"
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        for name in ("KUBERNETES_SERVICE_HOST", "KVPOOL_NAMESPACE", "KVPOOL_STANDALONE"):
            env.pop(name, None)
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "kvpool.cli.main", "operator", "--all-namespaces",
             "--health-port", str(ports["health"]), "--webhook-port", str(ports["webhook"]),
             "--metrics-port", str(ports["metrics"]), "--webhook-cert-dir", str(certs_dir),
             "--webhook-dns-name", "localhost", "--webhook-config-name", "kvpool-webhook"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            ca = certs_dir / certs.CA_CERT
            async with aiohttp.ClientSession() as probe:
                for _ in range(300):
                    if proc.poll() is not None:
                        break
                    if ca.exists():
                        try:
                            tls = ssl.create_default_context(cafile=str(ca))
                            async with probe.get(
                                f"https://localhost:{ports['webhook']}/readyz", ssl=tls
                            ) as r:
                                if r.status == 200:
                                    break
                        except (aiohttp.ClientError, ssl.SSLError, OSError):
                            pass
                    await asyncio.sleep(0.1)
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            # The API server verifies the webhook with the caBundle: the operator put its CA there.
            hook = cluster.get(WEBHOOKS, "kvpool-webhook", namespace=None)
            bundle = base64.b64decode(hook["webhooks"][0]["clientConfig"]["caBundle"])
            assert bundle == ca.read_bytes()
            tls = ssl.create_default_context(cadata=bundle.decode())  # only what the API server trusts
            endpoint = f"https://localhost:{ports['webhook']}/mutate-pods"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
                for shape, (vllm_name, reason) in sorted(EXPECTED.items()):
                    original = pod(shape)
                    response = await admit(session, endpoint, review(original))
                    patched = apply(original, ops(response))
                    notes = patched["metadata"]["annotations"]
                    if reason is None:
                        assert "kvpool.io/injected" in notes, (shape, notes)
                        vllm = next(c for c in patched["spec"]["containers"] if c["name"] == vllm_name)
                        assert "--kv-transfer-config" in vllm["args"], shape
                    else:
                        assert reason in notes["kvpool.io/skip-reason"], (shape, notes)
                    again = await admit(session, endpoint, review(patched))
                    assert ops(again) == [], f"{shape}: admitting the patched pod again changed it"
                # A pool that does not exist, and a request the webhook cannot read: admitted all the same.
                missing = pod("bare-vllm-serve")
                missing["metadata"]["annotations"]["kvpool.io/pool"] = "nope"
                patched = jsonpatch.apply_patch(missing, ops(await admit(session, endpoint, review(missing))))
                assert (
                    patched["metadata"]["annotations"]["kvpool.io/skip-reason"]
                    == "KVCachePool serving/nope not found"
                )
                broken = review(pod("bare-vllm-serve"))
                broken["request"]["object"]["metadata"] = 5
                assert "patch" not in await admit(session, endpoint, broken)
            async with (
                aiohttp.ClientSession() as plain,
                plain.get(f"http://127.0.0.1:{ports['metrics']}/metrics") as r,
            ):
                metrics = await r.text()
            injected = sum(v is None for _, v in EXPECTED.values())
            assert f'kvpool_webhook_admissions_total{{outcome="injected"}} {float(injected)}' in metrics, (
                metrics
            )
            assert 'kvpool_webhook_admissions_total{outcome="error"} 1.0' in metrics
        finally:
            proc.terminate()
            try:
                out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        text = out.decode(errors="replace")
        assert "Webhook serving https://0.0.0.0" in text, text[-3000:]
        assert "not injected: container 'mistral-7b' starts vLLM inside a shell line" in text, text[-3000:]
