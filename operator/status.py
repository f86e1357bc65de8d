"""A pool's status from its children's status: the phase and conditions `kubectl get kvp` shows.

Pure: the handlers read the StatefulSet and the lookup Deployment and pass them in, so every phase
and condition rule is tested without a cluster.

Pending or Degraded with no node ready: the StatefulSet's status cannot tell an unschedulable pod
from a crash-looping one, so the pool's own history decides. A pool none of whose nodes has been
ready yet (new, scaled up from 0, or still pulling images) is `Pending`; one that had ready nodes
(its previous status counted ready nodes, or was already Degraded for unready nodes) and lost
them all is `Degraded`. So a pool whose pods crash from the start stays `Pending`, with a message that says
where to look.
"""

from __future__ import annotations

import datetime
from typing import Any

from . import naming, sizing
from .builders.common import NODE_COMPONENT, client_secrets, endpoints
from .settings import PoolSettings

CONDITION_TYPES = ("Available", "Progressing", "Degraded", "ConfigValid")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    previous: list[dict[str, Any]],
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    at: str,
) -> dict[str, Any]:
    """One condition; lastTransitionTime moves only when the status flips."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == status and old.get("lastTransitionTime")
        else at
    )
    out = {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def _rollout(sts: dict[str, Any] | None, desired: int) -> tuple[int, bool, str]:
    """(ready replicas, rolled out?, message) of the cache-node StatefulSet."""
    if sts is None:
        return 0, desired == 0, "the StatefulSet does not exist yet"
    st = sts.get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    current = int(st.get("replicas") or 0)
    observed = st.get("observedGeneration")
    generation = (sts.get("metadata") or {}).get("generation")
    seen = observed is None or generation is None or observed >= generation
    revision_done = st.get("updateRevision") is None or st.get("currentRevision") == st.get("updateRevision")
    done = seen and updated >= desired and current == desired and ready >= desired and revision_done
    if done:
        return ready, True, f"{ready}/{desired} cache nodes ready"
    return ready, False, f"{ready}/{desired} cache nodes ready, {updated}/{desired} updated"


def compute(
    body: dict[str, Any],
    settings: PoolSettings | None,
    error: str | None,
    sts: dict[str, Any] | None,
    lookup: dict[str, Any] | None,
    at: str | None = None,
    refused: str | None = None,
) -> dict[str, Any]:
    """The status to patch onto pool `body`. `error`: why the spec is invalid (settings is then None).
    `refused`: what the API server refused to apply (the generation then counts as not observed)."""
    at = at or now()
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    previous = list((body.get("status") or {}).get("conditions") or [])
    desired = settings.replicas if settings else int(((sts or {}).get("spec") or {}).get("replicas") or 0)
    ready, rolled, message = _rollout(sts, desired)
    sts_replicas = int(((sts or {}).get("status") or {}).get("replicas") or 0)
    lookup_want = settings.lookup_replicas if settings else 0
    lookup_ready = int(((lookup or {}).get("status") or {}).get("readyReplicas") or 0)

    available = ready > 0 or desired == 0
    never_ready = ready == 0 and not _was_ready(body.get("status") or {})
    degraded = rolled is False and sts is not None and ready < desired and _stalled(sts) and not never_ready
    if never_ready and desired and sts is not None:
        message = f"{message}; {NEVER_READY}"
    if settings is not None and lookup_want and lookup is not None and lookup_ready == 0 and rolled:
        degraded, message = True, f"{message}; lookup service has no ready replica"
    if refused is not None:
        degraded, message = True, refused
    if error is not None:
        phase = "Invalid"
    elif desired == 0:
        phase = "Stopped"
    elif rolled and not degraded:
        phase = "Running"
    elif degraded:
        phase = "Degraded"
    elif ready == 0:
        phase = "Pending"
    else:
        phase = "Progressing"

    conditions = [
        condition(
            previous,
            "Available",
            available,
            "NodesReady" if available else "NoNodeReady",
            message,
            generation,
            at,
        ),
        condition(
            previous,
            "Progressing",
            not rolled,
            "RollingOut" if not rolled else "RolledOut",
            message,
            generation,
            at,
        ),
        condition(
            previous,
            "Degraded",
            degraded,
            ("ApplyFailed" if refused else "NodesUnready") if degraded else "AsExpected",
            message,
            generation,
            at,
        ),
        condition(
            previous,
            "ConfigValid",
            error is None,
            "InvalidSpec" if error else "Valid",
            error or "the spec is valid and applied",
            generation,
            at,
        ),
    ]
    pool = meta.get("name", "")
    out: dict[str, Any] = {
        "phase": phase,
        "replicas": sts_replicas,
        "readyReplicas": ready,
        "selector": naming.selector_string(pool, NODE_COMPONENT),
        "conditions": conditions,
    }
    if generation is not None and refused is None:
        out["observedGeneration"] = generation
    if settings is not None:
        out["memory"] = sizing.quantity(settings.cache_bytes)
        out["containerMemory"] = sizing.quantity(settings.container_memory)
        out["endpoints"] = endpoints(settings)
        out["client"] = client_secrets(settings)
        out["hashing"] = settings.hashing()
        if lookup_want:
            out["lookupReadyReplicas"] = lookup_ready
    return out


NEVER_READY = (
    "no cache node has been ready yet (unschedulable, pulling the image, or failing to start: "
    "kubectl describe pod)"
)


def _was_ready(previous: dict[str, Any]) -> bool:
    """Whether the pool had ready nodes at its last status, or had lost them all already (Degraded
    for unready nodes): what tells Degraded from Pending when no node is ready."""
    if int(previous.get("readyReplicas") or 0) > 0:
        return True
    return any(
        c.get("type") == "Degraded" and c.get("status") == "True" and c.get("reason") == "NodesUnready"
        for c in previous.get("conditions") or []
    )


def _stalled(sts: dict[str, Any]) -> bool:
    """A rollout that is not moving: every pod updated but some are not ready (crash loops, OOM, probes)."""
    st = sts.get("status") or {}
    want = int((sts.get("spec") or {}).get("replicas") or 0)
    return int(st.get("updatedReplicas") or 0) >= want and int(st.get("currentReplicas") or want) >= want
