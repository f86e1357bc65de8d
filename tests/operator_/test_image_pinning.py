"""A pool without spec.image keeps the image it was created with across operator upgrades."""

from __future__ import annotations

from typing import Any

import pytest

from kvpool.operator import handlers, settings


def _running(image: str) -> dict[str, Any]:
    return {"spec": {"template": {"spec": {"containers": [{"name": "node", "image": image}]}}}}


def test_the_pin_is_the_image_of_a_pool_without_spec_image() -> None:
    pool = {"metadata": {"annotations": {settings.PINNED_IMAGE: "old:1"}}, "spec": {"replicas": 2}}
    assert settings.effective_spec(pool) == {"replicas": 2, "image": "old:1"}
    assert settings.parse("p", "ns", settings.effective_spec(pool)).image == "old:1"
    pool["spec"]["image"] = "mine:3"  # an explicit image wins
    assert settings.parse("p", "ns", settings.effective_spec(pool)).image == "mine:3"
    assert settings.effective_spec({"metadata": {}}) == {}


def test_on_resume_an_unpinned_pool_adopts_what_its_nodes_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool from a version that did not pin: upgrading to this one rolls nothing."""
    monkeypatch.setattr(settings, "DEFAULT_IMAGE", "new:2")
    assert handlers.image_to_pin(_running("old:1"), adopt_running=True) == "old:1"
    assert handlers.image_to_pin(None, adopt_running=True) == "new:2"
    assert handlers.image_to_pin(_running("old:1"), adopt_running=False) == "new:2"


class FakeKube:
    def __init__(self, sts: dict[str, Any] | None) -> None:
        self.sts = sts
        self.patches: list[dict[str, Any]] = []

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.sts if kind == "StatefulSet" else None

    def merge_patch(
        self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]
    ) -> None:
        self.patches.append(body)


def test_pin_image_records_the_pin_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "DEFAULT_IMAGE", "new:2")
    kube = FakeKube(_running("old:1"))
    pool: dict[str, Any] = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {}}
    handlers.pin_image(kube, pool, adopt_running=True)  # type: ignore[arg-type]
    assert kube.patches == [{"metadata": {"annotations": {settings.PINNED_IMAGE: "old:1"}}}]
    assert settings.pinned_image(pool) == "old:1"
    handlers.pin_image(kube, pool, adopt_running=False)  # type: ignore[arg-type]
    assert len(kube.patches) == 1
    explicit: dict[str, Any] = {"metadata": {"name": "q", "namespace": "ns"}, "spec": {"image": "mine:3"}}
    handlers.pin_image(kube, explicit, adopt_running=False)  # type: ignore[arg-type]
    assert len(kube.patches) == 1 and settings.pinned_image(explicit) is None
