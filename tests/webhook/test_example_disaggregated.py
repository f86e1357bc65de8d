"""examples/disaggregated.yaml (docs/disaggregated.md): the pool fits the CRD, the Deployments are
valid, and the webhook injects prefill pods as producers and decode pods as consumers, leaving the
routing sidecar alone."""

from __future__ import annotations

import json
import pathlib

import kubernetes_validate
import yaml

from kvpool.operator.webhook import patch, vllm_command

from ..operator_.schema_tools import validate
from .shapes import K8S, apply, container, pool, template_pod

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "disaggregated.yaml"


def test_prefill_pods_produce_and_decode_pods_consume() -> None:
    docs = list(yaml.safe_load_all(EXAMPLE.read_text()))
    (kvp,) = (d for d in docs if d["kind"] == "KVCachePool")
    validate(kvp)
    roles = {}
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        kubernetes_validate.validate(deployment, K8S, strict=True)
        template = deployment["spec"]["template"]
        pod = template_pod(deployment, "serving")
        decision = patch.admit(pod, "serving", pool("serving"))
        assert decision.injected, decision.reason
        patched = apply(pod, decision.patch)
        words = vllm_command.argv(container(patched, "vllm"))
        roles[deployment["metadata"]["name"]] = json.loads(words[words.index("--kv-transfer-config") + 1])[
            "kv_role"
        ]
        sidecars = [c for c in template["spec"].get("initContainers", []) if c["name"] == "routing-proxy"]
        assert [c for c in patched["spec"]["initContainers"] if c["name"] == "routing-proxy"] == sidecars
    assert roles == {"qwen-prefill": "kv_producer", "qwen-decode": "kv_consumer"}
