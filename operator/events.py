"""Normal Events on a pool (`kubectl describe kvp`): scale, rollout and handoff, beside the warnings.

Which events to post is decided by pure functions of what the operator read and rendered, so every
rule is tested without a cluster; `post` hands them to kopf's event poster. `status_written` and
`stats_read` remember, per pool, what the previous status and node read showed.

- `Scaled`: a change handler sets the StatefulSet's replicas to a new count.
- `RollingOut`: a change handler writes a new pod template (a spec or ConfigMap change rolls the
  nodes, one at a time, each handing its chunks over as it stops).
- `RolledOut`: a status pass sees a rollout (or a pool's first start) finish: every node updated
  and ready.
- `HandedOff`: a status pass sees a node's handoff counters grow between two reads of its /metrics
  (`kvpool_handoff_chunks_total`). The nodes hand chunks over by themselves (the operator starts
  no handoff): a node that stays (reason `rebalance`, after a node joined or came back) is seen; a
  stopping node (reason `leave`) usually exits before the next read, so its handoff is logged by
  the node and counted in its metrics, but rarely reaches an Event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from .builders.common import CONFIG_HASH
from .kube import contains
from .nodestats import NodeStats, handoffs

log = logging.getLogger(__name__)

Event = tuple[str, str]
"""(reason, message) of a Normal event."""


def _replicas(sts: Mapping[str, Any] | None) -> int | None:
    return None if sts is None else int((sts.get("spec") or {}).get("replicas") or 0)


def _template(sts: Mapping[str, Any]) -> Mapping[str, Any]:
    return (sts.get("spec") or {}).get("template") or {}


def change_events(current: Mapping[str, Any] | None, desired: Mapping[str, Any] | None) -> list[Event]:
    """Events for applying the StatefulSet `desired` over `current` (as read before; None: absent)."""
    if current is None or desired is None:
        return []
    out: list[Event] = []
    old, new = _replicas(current), _replicas(desired)
    if old != new:
        out.append(("Scaled", f"cache nodes scaled from {old} to {new}"))
    if not contains(_template(current), _template(desired)):
        old_hash = ((_template(current).get("metadata") or {}).get("annotations") or {}).get(CONFIG_HASH)
        new_hash = ((_template(desired).get("metadata") or {}).get("annotations") or {}).get(CONFIG_HASH)
        why = "configuration changed" if old_hash != new_hash else "pod template changed"
        out.append((
            "RollingOut",
            f"{why}: rolling {new} cache nodes one at a time (each hands its chunks over as it stops)",
        ))  # fmt: skip
    return out


def progressing(status: Mapping[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "Progressing":
            return str(c.get("status"))
    return None


def status_events(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """Events for a status moving from `previous` to `new`: a finished rollout."""
    if progressing(previous) == "True" and progressing(new) == "False" and new.get("phase") == "Running":
        ready = new.get("readyReplicas", 0)
        return [("RolledOut", f"{ready}/{ready} cache nodes updated and ready")]
    return []


def handoff_events(before: Mapping[str, NodeStats], after: Mapping[str, NodeStats]) -> list[Event]:
    """Events for the handoffs nodes made between two reads of their /metrics."""
    out: list[Event] = []
    for node, reason, results in handoffs(before, after):
        total = sum(results.values())
        detail = ", ".join(f"{n} {result}" for result, n in sorted(results.items()))
        out.append(
            ("HandedOff", f"node {node} handed {total} chunks to their new owners ({reason}): {detail}")
        )
    return out


def post(body: Mapping[str, Any], events: list[Event]) -> None:
    """Post `events` as Normal events on the pool `body` (outside an operator run: only logged)."""
    for reason, message in events:
        meta = body.get("metadata") or {}
        log.info(f"{meta.get('namespace')}/{meta.get('name')}: {reason}: {message}")
        # No kopf context (a pass run by hand, outside an operator run): the log line is all there is.
        with contextlib.suppress(LookupError):
            kopf.event(body, type="Normal", reason=reason, message=message)  # type: ignore[arg-type]


_progressing: dict[str, str | None] = {}
"""Each pool's (by uid) Progressing condition as this process last computed it: the body may lag."""
_node_stats: dict[str, dict[str, NodeStats]] = {}
"""Each pool's nodes' figures at the last pass: handoffs are what grew since."""


def status_written(key: str, pool: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Post the events of pool `key`'s status moving to `new` (a finished rollout), from what this
    process last computed when it has (one RolledOut per rollout), else from the body's status."""
    previous = dict(pool.get("status") or {})
    if key in _progressing:
        previous["conditions"] = [{"type": "Progressing", "status": _progressing[key]}]
    post(pool, status_events(previous, new))
    _progressing[key] = progressing(new)


def stats_read(key: str, pool: Mapping[str, Any], stats: Mapping[str, NodeStats | None]) -> None:
    """Post the handoffs pool `key`'s nodes made since the last read; a node that did not answer
    keeps its last figures as the baseline for when it does."""
    before = _node_stats.get(key, {})
    seen = {node: figures for node, figures in stats.items() if figures is not None}
    post(pool, handoff_events(before, seen))
    _node_stats[key] = {n: f for n in stats if (f := seen.get(n) or before.get(n)) is not None}


def forget(key: str) -> None:
    """Pool `key` is gone."""
    _progressing.pop(key, None)
    _node_stats.pop(key, None)
