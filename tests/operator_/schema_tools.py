"""Helpers to treat the CRD's openAPIV3Schema the way the API server does (validation, defaults)."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "kvcachepools.yaml"
# The KVCachePool examples (vllm-deployment.yaml is tested through the webhook: tests/webhook).
EXAMPLES = sorted((ROOT / "examples").glob("pool-*.yaml"))


def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes flavour) → JSON Schema: int-or-string becomes anyOf, x-* keys dropped."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes") and k != "default"
    }
    if node.get("x-kubernetes-int-or-string"):
        pattern = out.pop("pattern", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string", **({"pattern": pattern} if pattern else {})}]
    if (
        node.get("type") == "object"
        and "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out.setdefault("additionalProperties", False)  # the API server prunes unknown fields; we reject them
    return out


def validate(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `obj` breaks the CRD schema (CEL rules not evaluated)."""
    jsonschema.Draft7Validator(to_jsonschema(schema())).validate(obj)


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: fill absent fields that have a default."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and node.get("type") == "object":
        for key, sub in (node.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], v) for v in value]
    return value


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, sub in (node.get("properties") or {}).items():
        out += walk(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out
