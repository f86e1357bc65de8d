"""The CRD is a valid, structural CustomResourceDefinition with the contract's names; examples fit it."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvpool.operator import builders, settings

from .schema_tools import EXAMPLES, apply_defaults, crd, schema, validate, walk

K8S = "1.35.0"
OWNER = {"metadata": {"name": "x", "namespace": "ns", "uid": "1"}}


def test_crd_validates_against_kubernetes_strictly() -> None:
    kubernetes_validate.validate(crd(), K8S, strict=True)


def test_crd_has_the_contract_names_subresources_and_columns() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == "kvcachepools.kvpool.io"
    assert (spec["group"], spec["scope"]) == ("kvpool.io", "Namespaced")
    names = spec["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("KVCachePool", "kvcachepools", ["kvp"])
    assert spec["names"]["categories"] == ["kvpool"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Replicas", "Ready", "Phase", "Memory", "Age"} <= set(columns)
    for path in columns.values():  # every column points at a field the schema declares
        node = schema()
        for part in path.strip(".").split("."):
            if part not in ("metadata", "creationTimestamp"):
                node = node["properties"][part]


def test_schema_is_structural() -> None:
    """Every node has a type (or is int-or-string / preserve-unknown): what the API server requires."""
    for path, node in walk(schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object" and path not in ("", ".metadata"):
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"] and rule["message"], path


def test_chunk_size_is_immutable_by_cel() -> None:
    rules = schema()["properties"]["spec"]["properties"]["chunkSize"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf"} | {"message": rules[0]["message"]} == rules[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_and_renders(path: Any) -> None:
    example = yaml.safe_load(path.read_text())
    validate(example)
    spec = apply_defaults(schema(), example)["spec"]
    s = settings.parse(example["metadata"]["name"], "ns", spec)
    for obj in builders.desired(
        {**OWNER, "metadata": {**OWNER["metadata"], "name": s.name}}, s, service_monitors=False
    ):
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_examples_cover_the_documented_cases() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"pool-minimal.yaml", "pool-redis-s3.yaml", "pool-auth-tls.yaml"} <= names


@pytest.mark.parametrize(
    "spec",
    [
        {"chunkSize": 100},
        {"replicas": -1},
        {"memory": "lots"},
        {"tiers": {"redis": {"url": "http://x"}}},
        {"tiers": {"s3": {"url": "s3://B"}}},
        {"eviction": {"policy": "MRU"}},
        {"unknownField": 1},
        {"disk": {"storageClassName": "x"}},
    ],
)
def test_schema_rejects_bad_specs(spec: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate(
            {
                "apiVersion": "kvpool.io/v1alpha1",
                "kind": "KVCachePool",
                "metadata": {"name": "x"},
                "spec": spec,
            }
        )


def test_crd_defaults_match_the_operators_defaults() -> None:
    """A pool created with `spec: {}` gets the same settings whether the API server or the operator defaults it."""
    defaulted = apply_defaults(schema(), {"spec": {}})["spec"]
    assert defaulted["replicas"] == settings.DEFAULT_REPLICAS
    assert settings.parse("x", "ns", defaulted) == settings.parse("x", "ns", {})
    full = {
        "tiers": {
            "redis": {"url": "redis://r"},
            "s3": {"url": "s3://bucket/p", "credentialsSecret": {"name": "s"}},
        },
        "eviction": {},
        "lookup": {},
        "metrics": {"serviceMonitor": {}},
        "podDisruptionBudget": {},
        "disk": {"size": "10Gi"},
        "auth": {"tokenSecret": {"name": "t"}},
    }
    assert settings.parse("x", "ns", apply_defaults(schema()["properties"]["spec"], full)) == settings.parse(
        "x", "ns", full
    )


def test_docs_reference_is_generated_from_the_crd() -> None:
    from kvpool.cli.devtools import crd_reference

    from .schema_tools import CRD_PATH, ROOT

    doc = ROOT / "docs" / "operator.md"
    assert crd_reference.update(CRD_PATH, doc) == doc.read_text(), (
        "run python -m kvpool.operator.crd_reference"
    )
    assert "`spec.chunkSize`" in doc.read_text()
