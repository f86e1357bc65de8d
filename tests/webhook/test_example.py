"""examples/vllm-deployment.yaml, as docs/install.md tells users to apply it: valid, and its pod
template comes out of the webhook injected into a valid pod."""

from __future__ import annotations

import pathlib

import kubernetes_validate
import yaml

from kvpool.operator.webhook import patch

from .shapes import K8S, apply, container, env_of, pool, template_pod

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "vllm-deployment.yaml"


def test_example_deployment_is_valid_and_its_pods_are_injected() -> None:
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S, strict=True)
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    pod = template_pod(deployment, "serving")
    decision = patch.admit(pod, "serving", pool("serving"))
    assert decision.injected, decision.reason
    patched = apply(pod, decision.patch)
    assert "--kv-transfer-config" in container(patched, "vllm")["args"]
    assert env_of(container(patched, "vllm"))["KVPOOL_URL"] == "grpc://127.0.0.1:7420"
    assert patched["metadata"]["annotations"][patch.INJECTED_ANNOTATION] == "serving/kvpool"
