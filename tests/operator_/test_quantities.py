"""Kubernetes quantities by value: the API server stores `1024Gi` as `1Ti` and `10240Mi` as `10Gi`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from kvpool.operator import kube, sizing
from kvpool.operator.builders import statefulset
from kvpool.operator.settings import parse

OWNER = {"metadata": {"name": "pool", "namespace": "ns", "uid": "0b5e-uid"}}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1Ti", 2**40), ("1024Gi", 2**40), ("10240Mi", 10 * 2**30), ("1Ki", 1024), ("1Ei", 2**60),
        ("1k", 1000), ("1M", 10**6), ("1G", 10**9), ("1T", 10**12), ("1P", 10**15), ("1E", 10**18),
        ("500m", Decimal("0.5")), ("250u", Decimal("0.00025")), ("5n", Decimal("5e-9")),
        ("1e3", 1000), ("1E3", 1000), ("2e-3", Decimal("0.002")), ("1.5Gi", 3 * 2**29), (".5", Decimal("0.5")),
        ("+4", 4), ("-1Ki", -1024), ("1024", 1024), (12, 12),
    ],
)  # fmt: skip
def test_quantities_parse_to_their_value(text: Any, value: Any) -> None:
    assert sizing.quantity_value(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1 Gi", "1GiB", "1gi", "abc", "1.2.3", "1e", None, True, [1]])
def test_non_quantities_parse_to_none(text: Any) -> None:
    assert sizing.quantity_value(text) is None


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (1024, "1Ki"), (10 * 2**30, "10Gi"), (1552 * 2**20, "1552Mi"), (2**40, "1Ti"),
     (1000, "1k"), (1_500_000, "1500k"), (1024 * 1000, "1000Ki"), (2**30 + 1, "1073741825")],
)  # fmt: skip
def test_quantities_render_in_the_api_servers_canonical_form(n: int, text: str) -> None:
    assert sizing.quantity(n) == text
    assert sizing.quantity_value(text) == n


def test_contains_compares_resources_by_value_and_everything_else_as_written() -> None:
    actual = {
        "resources": {
            "limits": {"memory": "10Gi", "cpu": "1"},
            "requests": {"memory": "10Gi", "cpu": "250m"},
        },
        "sizeLimit": "1Gi",
        "env": [{"name": "KVPOOL_MEMORY", "value": "1Gi"}],
        "data": {"KVPOOL_RATIO": "1"},
    }
    same = {
        "resources": {"limits": {"memory": "10240Mi", "cpu": "1000m"}, "requests": {"memory": "10240Mi", "cpu": "0.25"}},
        "sizeLimit": "1024Mi",
    }  # fmt: skip
    assert kube.contains(actual, same)
    assert not kube.contains(actual, {"resources": {"limits": {"memory": "10Gi", "cpu": "2"}}})
    # Not quantities to whoever reads them: an env var, a ConfigMap value.
    assert not kube.contains(actual, {"env": [{"name": "KVPOOL_MEMORY", "value": "1024Mi"}]})
    assert not kube.contains(actual, {"data": {"KVPOOL_RATIO": "1.0"}})


def _sts(size: str, storage_class: str | None = None) -> dict[str, Any]:
    disk: dict[str, Any] = {"size": size, **({"storageClassName": storage_class} if storage_class else {})}
    return statefulset.build(OWNER, parse("pool", "ns", {"disk": disk}), "h")


def test_a_disk_stored_in_another_spelling_is_no_change() -> None:
    stored = _sts("1024Gi")
    stored["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] = "1Ti"
    assert statefulset.immutable_change(stored, _sts("1024Gi")) is None
    assert kube.contains(stored, _sts("1024Gi"))
    assert "cannot change" in statefulset.immutable_change(stored, _sts("2Ti"))
    assert "cannot change" in statefulset.immutable_change(stored, _sts("1Ti", "ssd"))
