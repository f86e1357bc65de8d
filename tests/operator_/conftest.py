"""The real operator (kopf, in its own thread and loop) against kmock's in-memory Kubernetes API.

See /work/shared/notes/kopf-on-kmock.md for why each step is here.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

os.environ.setdefault("KVPOOL_STATUS_INTERVAL", "0.3")  # before the handlers module reads it
# No node stats: the pools' nodes do not exist here, and where DNS is slow to say so, every status
# pass would wait for it. Tests that read real nodes' stats set scrape.STATS_TIMEOUT themselves.
os.environ.setdefault("KVPOOL_STATS_TIMEOUT", "0")

import aiohttp
import kmock
import kubernetes.config
import pytest
import pytest_asyncio
import yaml

POOLS = "kvpool.io/v1alpha1/kvcachepools"
NS = "team-a"
ROOT = pathlib.Path(__file__).resolve().parents[2]


class Cluster:
    """The emulator plus helpers that act like `kubectl` over HTTP."""

    def __init__(self, emulator: kmock.KubernetesEmulator, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.session = session
        self.generations: dict[str, int] = {}
        self.stop_operator: Callable[[], Any] = lambda: None
        """Stop the operator (and wait for it), as when it is scaled to 0 or uninstalled first."""

    def get(self, resource: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        try:
            obj = self.emulator.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def versions(self, resource: str, name: str, namespace: str = NS) -> int:
        """How many versions the emulator stored for an object: every write adds one."""
        return len(self.emulator.objects[resource, namespace, name].history)

    async def create_pool(
        self, name: str, spec: dict[str, Any], namespace: str = NS, **metadata: Any
    ) -> dict[str, Any]:
        body = {
            "apiVersion": "kvpool.io/v1alpha1",
            "kind": "KVCachePool",
            # The emulator sets none of these; a real API server does.
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": "1",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                **metadata,
            },
            "spec": spec,
        }
        self.generations[name] = 1
        async with self.session.post(
            f"/apis/kvpool.io/v1alpha1/namespaces/{namespace}/kvcachepools", json=body
        ) as r:
            assert r.status < 300, await r.text()
            return await r.json()

    async def patch(self, url: str, patch: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(url, json=patch, headers=headers) as r:
            assert r.status < 300, await r.text()
            return await r.json()

    async def patch_pool_spec(self, name: str, spec: dict[str, Any], namespace: str = NS) -> None:
        """Like `kubectl patch --type=merge`; a real server bumps the generation on spec changes."""
        self.generations[name] += 1
        await self.patch(
            f"/apis/kvpool.io/v1alpha1/namespaces/{namespace}/kvcachepools/{name}",
            {"metadata": {"generation": self.generations[name]}, "spec": spec},
        )

    async def delete_pool(self, name: str, namespace: str = NS) -> None:
        await self.delete(f"/apis/kvpool.io/v1alpha1/namespaces/{namespace}/kvcachepools/{name}")

    async def delete(self, url: str) -> None:
        """Like `kubectl delete`: the emulator removes an object without finalizers at once."""
        async with self.session.delete(url) as r:
            assert r.status < 300, await r.text()

    async def wait_for(self, what: Callable[[], Any], timeout: float = 10.0, message: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = what()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {message or what}")
            await asyncio.sleep(0.05)

    def requests(self) -> list[kmock.Request]:
        return list(self.emulator)


def _declare_resources(emulator: kmock.KubernetesEmulator, service_monitors: bool) -> None:
    emulator.resources.load_bundled()  # the builtin kinds, v1/namespaces included (kopf waits for it)
    crd = yaml.safe_load((ROOT / "crds" / "kvcachepools.yaml").read_text())
    emulator.resources[POOLS] = kmock.ResourceInfo(
        kind=crd["spec"]["names"]["kind"],
        singular=crd["spec"]["names"]["singular"],
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        shortnames=set(crd["spec"]["names"]["shortNames"]),
        categories=set(crd["spec"]["names"]["categories"]),
        subresources={"status", "scale"},
    )
    if service_monitors:
        emulator.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
            kind="ServiceMonitor",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "delete"},
        )


@pytest.fixture
def service_monitors() -> bool:
    """Override in a test module to serve the Prometheus-operator's ServiceMonitor kind."""
    return False


@pytest_asyncio.fixture
async def cluster(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, service_monitors: bool
) -> AsyncIterator[Cluster]:
    from kvpool.operator import runner

    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        _declare_resources(emulator, service_monitors)
        url = str(server.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump({
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": url}}],
                "users": [{"name": "kmock", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                "current-context": "kmock",
            })
        )  # fmt: skip
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # The kubernetes library reads $KUBECONFIG once, at import; kopf's login uses that default.
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        stop, ready = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                runner.run([NS], health_port=None, standalone=True, stop_flag=stop, ready_flag=ready)
            except BaseException as exc:  # surfaced by the fixture's teardown
                errors.append(exc)

        thread = threading.Thread(target=run, name="kopf", daemon=True)
        thread.start()

        async def stop_operator() -> None:
            stop.set()
            await asyncio.to_thread(thread.join, 20)

        async with aiohttp.ClientSession(base_url=url) as session:
            c = Cluster(emulator, session)
            c.stop_operator = stop_operator
            # Objects created before kopf's WATCH would be replayed to it as ADDED twice.
            await c.wait_for(
                lambda: any(
                    r.action == kmock.action.WATCH
                    and r.resource is not None
                    and r.resource.plural == "kvcachepools"
                    for r in c.requests()
                ),
                timeout=float(os.environ.get("KOPF_WAIT", "20")),
                message="kopf to watch kvcachepools",
            )
            try:
                yield c
            finally:
                await stop_operator()
        assert not thread.is_alive(), "kopf did not stop"
        assert not errors, errors
