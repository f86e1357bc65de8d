"""Pending or Degraded when no node is ready: the pool's history decides (docs/operator.md, phases)."""

from __future__ import annotations

from typing import Any

from kvpool.operator import status
from kvpool.operator.settings import parse

S = parse("pool", "ns", {"replicas": 3, "lookup": {"replicas": 0}})


def _sts(ready: int, updated: int = 3, replicas: int = 3) -> dict[str, Any]:
    return {"metadata": {"generation": 1}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": updated, "currentReplicas": replicas}}  # fmt: skip


def _compute(previous: dict[str, Any] | None, sts: dict[str, Any]) -> dict[str, Any]:
    body = {"metadata": {"name": "pool", "generation": 1}, "status": previous or {}}
    return status.compute(body, S, None, sts, None, at="T")


def _degraded(st: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == "Degraded")


def test_pods_that_were_never_ready_are_pending_not_degraded() -> None:
    """Unschedulable pods: all created and updated, none ready, none ever was."""
    st = _compute(None, _sts(ready=0))
    assert st["phase"] == "Pending" and _degraded(st)["status"] == "False"
    assert "no cache node has been ready yet" in _degraded(st)["message"]
    assert _compute(st, _sts(ready=0))["phase"] == "Pending"  # and it stays so


def test_a_pool_that_lost_every_ready_node_is_degraded_and_stays_so() -> None:
    running = _compute(None, _sts(ready=3))
    assert running["phase"] == "Running"
    lost = _compute(running, _sts(ready=0))
    assert lost["phase"] == "Degraded" and _degraded(lost)["reason"] == "NodesUnready"
    assert _compute(lost, _sts(ready=0))["phase"] == "Degraded"


def test_scaling_up_from_zero_is_pending() -> None:
    stopped = status.compute(
        {"metadata": {"name": "pool", "generation": 1}}, parse("pool", "ns", {"replicas": 0}), None,
        _sts(ready=0, updated=0, replicas=0), None, at="T",
    )  # fmt: skip
    assert stopped["phase"] == "Stopped"
    assert _compute(stopped, _sts(ready=0))["phase"] == "Pending"


def test_a_refused_apply_does_not_count_as_having_been_ready() -> None:
    body = {"metadata": {"name": "pool", "generation": 1}}
    refused = status.compute(body, S, None, None, None, at="T", refused="403 Forbidden")
    assert refused["phase"] == "Degraded"
    assert _compute(refused, _sts(ready=0))["phase"] == "Pending"


def test_some_ready_and_stuck_is_still_degraded() -> None:
    assert _compute(None, _sts(ready=2))["phase"] == "Degraded"
