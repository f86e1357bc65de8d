"""The cache nodes' PodDisruptionBudget: drains take nodes one at a time, so the pool keeps serving."""

from __future__ import annotations

from typing import Any

from .. import naming
from ..settings import PoolSettings
from .common import NODE_COMPONENT


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": naming.metadata(owner, naming.statefulset_name(s.name), NODE_COMPONENT),
        "spec": {
            "maxUnavailable": s.pdb_max_unavailable,
            "selector": {"matchLabels": naming.selector(s.name, NODE_COMPONENT)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
