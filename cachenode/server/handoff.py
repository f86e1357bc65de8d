"""Handing chunks to their new owners when the pool's view changes.

Two occasions, one mechanism:
- leaving: a node stopped with SIGTERM (scale-down, rolling update) pushes the memory-tier chunks
  it owns to the nodes that own them once it is gone, within `--handoff-deadline`;
- rebalancing: when a member joins (or comes back), the node pushes the memory-tier chunks that
  member now owns. It keeps its own copy; LRU eviction reclaims it.

Only one node pushes a given chunk: the first of its old owners still in the new view (or the
leaving node itself), and only to owners that were not owners before (they already hold it).
The most recently used chunks go first, so a deadline cuts off the coldest ones. Clients cover
what is not pushed yet: a read whose new owner misses asks the old owners (client.py).

`plan` is pure; `push` does the I/O.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.members import MemberInfo
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import KVPoolError, NodeLeaving
from kvpool.cachenode.core.placement import Placement

log = logging.getLogger(__name__)

BATCH_BYTES = 32 * 1024 * 1024
BATCH_KEYS = 64


def plan(
    keys: Iterable[bytes], old: Placement, new: Placement, me: str, replicas: int
) -> dict[str, list[bytes]]:
    """For each node, the keys (in the given order) this node `me` should push to it."""
    out: dict[str, list[bytes]] = defaultdict(list)
    keys = list(keys)
    if not new.nodes or not old.nodes:
        return out
    staying = me in new.nodes
    for key, old_owners, new_owners in zip(
        keys, old.owners_many(keys, replicas), new.owners_many(keys, replicas), strict=True
    ):
        if me not in old_owners:
            continue  # not ours to hand over (its owners hold it)
        if staying and next((o for o in old_owners if o in new.nodes), None) != me:
            continue  # another old owner that stays pushes it
        for node in new_owners:
            if node not in old_owners:
                out[node].append(key)
    return out


@dataclass
class HandoffReport:
    reason: str  # "leave" or "rebalance"
    planned: int = 0
    pushed: int = 0
    failed: int = 0
    gone: int = 0  # evicted or deleted before their turn
    late: int = 0  # not pushed because the deadline passed (or the handoff was cancelled)
    seconds: float = 0.0
    targets: dict[str, int] = field(default_factory=dict)  # chunks pushed per node

    def to_dict(self) -> dict:
        return asdict(self)


def push(
    work: Mapping[str, list[bytes]],
    members: Mapping[str, MemberInfo],
    value_of: Callable[[bytes], object | None],
    options: ConnectOptions,
    *,
    deadline: float,
    reason: str,
    cancel: threading.Event | None = None,
) -> HandoffReport:
    """Push each node's keys to it, nodes in parallel, batches in key order, until `deadline`
    (time.monotonic()). `value_of(key)` gives the value, or None if it is gone meanwhile."""
    started = time.monotonic()
    report = HandoffReport(reason, planned=sum(len(v) for v in work.values()))
    lock = threading.Lock()

    def to_node(node: str, keys: list[bytes]) -> None:
        info = members.get(node)
        if info is None:
            with lock:
                report.failed += len(keys)
            return
        conn = NodeConnection(info.host, info.grpc_port, options)
        pushed = failed = gone = 0
        batch: list[tuple[bytes, object]] = []
        size = 0

        def send() -> bool:
            nonlocal pushed, failed, batch, size
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                return False
            try:
                conn.put_many(batch)
                pushed += len(batch)
            except NodeLeaving:
                log.info("handoff to %s stopped: it is leaving too", node)
                return False
            except KVPoolError as exc:
                failed += len(batch)
                log.warning("handoff of %d chunks to %s failed: %s", len(batch), node, exc)
            batch, size = [], 0
            return True

        try:
            for key in keys:
                value = value_of(key)
                if value is None:
                    gone += 1
                    continue
                batch.append((key, value))
                size += memoryview(value).nbytes
                if (len(batch) >= BATCH_KEYS or size >= BATCH_BYTES) and not send():
                    break
            else:
                if batch:
                    send()
        finally:
            conn.close()
            with lock:
                report.pushed += pushed
                report.failed += failed
                report.gone += gone
                report.targets[node] = pushed

    if work:
        with ThreadPoolExecutor(len(work), thread_name_prefix="kvpool-handoff") as pool:
            for future in [pool.submit(to_node, node, keys) for node, keys in work.items()]:
                future.result()
    report.late = max(0, report.planned - report.pushed - report.failed - report.gone)
    report.seconds = round(time.monotonic() - started, 3)
    metrics.HANDOFF_CHUNKS.labels(reason, "pushed").inc(report.pushed)
    metrics.HANDOFF_CHUNKS.labels(reason, "failed").inc(report.failed)
    metrics.HANDOFF_CHUNKS.labels(reason, "late").inc(report.late)
    return report
