"""The pod shapes the webhook is tested on (tests/webhook/pods, written after real-world manifests),
what each must come out as, and helpers to apply a decision the way the API server does."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import jsonpatch
import kubernetes_validate
import yaml

PODS = pathlib.Path(__file__).with_name("pods")
K8S = "1.35.0"
POOL = {
    "apiVersion": "kvpool.io/v1alpha1",
    "kind": "KVCachePool",
    "metadata": {
        "name": "kvpool",
        "namespace": "serving",
        "uid": "u1",
        "resourceVersion": "1",
        "generation": 1,
    },
    "spec": {"replicas": 2, "memory": "1GiB", "agent": {"memory": "1GiB"}},
}
SECURE_SPEC = {"auth": {"tokenSecret": {"name": "kvpool-token"}}, "tls": {"secretName": "kvpool-tls"}}

# shape → (vLLM container, None when injected, else a phrase of the skip reason)
EXPECTED: dict[str, tuple[str | None, str | None]] = {
    "production-stack": ("vllm", None),
    "kserve-vllm": ("kserve-container", None),
    "llm-d-decode": ("vllm", None),
    "bare-vllm-serve": ("server", None),
    "entrypoint-only": ("engine", None),
    "llm-d-prefill-nixl": (None, "already has a --kv-transfer-config"),
    "transfer-config-lmcache": (None, "already has a --kv-transfer-config"),
    "shell-wrapped": (None, "inside a shell line (sh -c)"),
}


def pod(shape: str) -> dict[str, Any]:
    return yaml.safe_load((PODS / f"{shape}.yaml").read_text())


def pool(namespace: str = "serving", **spec: Any) -> dict[str, Any]:
    out = copy.deepcopy(POOL)
    out["metadata"]["namespace"] = namespace
    out["spec"].update(spec)
    return out


def apply(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """What the API server stores: the JSON Patch applied by a JSON-patch library, then validated
    against Kubernetes 1.35's schema, strictly (unknown fields are errors)."""
    patched = jsonpatch.apply_patch(obj, ops)
    kubernetes_validate.validate(patched, K8S, strict=True)
    return patched


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in obj["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def template_pod(deployment: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The pod a Deployment's template makes, as the webhook receives it."""
    template = deployment["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "namespace": namespace},
            "spec": template["spec"]}  # fmt: skip
