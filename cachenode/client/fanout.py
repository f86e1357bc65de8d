"""Calls to several pool members at once, and the handoff copies a read leaves behind.

A request split by node runs one group per member in parallel, the caller's thread taking one
(lookups on the data channel's control ops: every group sent from the caller's thread, then every
answer read there); a member that fails is reported (its breaker opens, or it is marked leaving)
and its group comes back in the failures, for the caller to route again. Copies to new owners run
in the background on the same threads.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from kvpool.cachenode.client.routing import Member, Routing
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.errors import KVPoolError, NixlRequired, Unavailable

log = logging.getLogger(__name__)

PARALLEL_CALLS = 16


class FanOut:
    """Thread-safe. `on_failure(member, exc)` hears of every member whose call was Unavailable."""

    def __init__(self, on_failure: Callable[[Member, Exception], None]) -> None:
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.handoff_copies = 0  # values found at an earlier owner and copied to the new one
        self.fallback_hits = 0  # keys found away from their current owners after those missed

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def run(self, routing: Routing, groups: Mapping[str, list], call, begin=None) -> tuple[dict, dict]:
        """Run `call(member, items)` for each node's group in parallel (the caller's thread takes
        one group). Returns (results by node, Unavailable by node); other errors propagate.

        `begin(member, items)`, where given, sends a group's request without waiting and returns
        the function that waits for its answer (None: that node takes `call`): the caller's
        thread then has every such request in flight at once, with no hop to a worker thread."""
        results: dict = {}
        failed: dict = {}

        def settle(node: str, answer):
            member = routing.members[node]
            try:
                value = answer()
            except NixlRequired:
                raise  # transport="nixl" refused a fallback: the node itself is fine
            except Unavailable as exc:
                self._on_failure(member, exc)
                return node, False, exc
            member.breaker.record_success()
            return node, True, value

        def one(node: str):
            return settle(node, lambda: call(routing.members[node], groups[node]))

        nodes = list(groups)
        started = self._begin(routing, groups, begin, failed) if begin is not None and len(nodes) > 1 else {}
        rest = [n for n in nodes if n not in started and n not in failed]
        futures = [self._pool().submit(one, node) for node in rest[1:]]
        outcomes = []
        try:
            if rest:
                outcomes.append(one(rest[0]))
            while started:
                node, finish = started.popitem()
                outcomes.append(settle(node, finish))
        finally:
            _drain(started.values())  # an error above: the other answers are read, not left on sockets
        outcomes.extend(f.result() for f in futures)
        for node, ok, value in outcomes:
            (results if ok else failed)[node] = value
        return results, failed

    def _begin(self, routing: Routing, groups: Mapping[str, list], begin, failed: dict) -> dict:
        """Send every group `begin` takes; nodes whose send failed go into `failed`."""
        started: dict = {}
        for node, items in groups.items():
            member = routing.members[node]
            try:
                finish = begin(member, items)
            except NixlRequired:
                _drain(started.values())
                raise
            except Unavailable as exc:
                self._on_failure(member, exc)
                failed[node] = exc
                continue
            except BaseException:
                _drain(started.values())
                raise
            if finish is not None:
                started[node] = finish
        return started

    def present_elsewhere(
        self,
        routing: Routing,
        keys: list[bytes],
        indices: Iterable[int],
        known: Mapping[int, bool],
        asked: Mapping[int, str],
    ) -> dict[int, str]:
        """Ask every other place each key may be (one Contains per node, in parallel); the node
        holding each key found."""
        groups: dict[str, list[int]] = defaultdict(list)
        wanted = [i for i in indices if not known.get(i)]
        for i, candidates in zip(wanted, routing.candidates([keys[i] for i in wanted]), strict=True):
            for node in candidates:
                if node != asked.get(i) or i not in known:
                    groups[node].append(i)
        flags, _ = self.run(
            routing,
            groups,
            lambda m, idx: m.conn.contains([keys[i] for i in idx]),
            lambda m, idx: m.conn.begin("contains", [keys[i] for i in idx]),
        )
        present: dict[int, str] = {}
        for node, idx in groups.items():
            for i, flag in zip(idx, flags.get(node, ()), strict=False):
                if flag and i not in present:
                    present[i] = node
        return present

    def count_fallbacks(self, routing: Routing, found_at: Mapping[bytes, str], op: str) -> None:
        """Count the keys of `found_at` (key -> node it was found at) that were not at a
        current owner: the reads a join would have turned into misses."""
        for key, node in found_at.items():
            via = routing.fallback_kind(key, node)
            if via is not None:
                self.fallback_hits += 1
                metrics.CLIENT_FALLBACK_HITS.labels(op, via).inc()

    def copy_to_new_owners(
        self, routing: Routing, values: Mapping[bytes, bytes], missed: Mapping[bytes, list[str]]
    ) -> None:
        """Handoff on read: values found away from an owner that missed are copied to it, in
        the background (a failed copy only means the next read asks the earlier owner again)."""
        groups: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
        for (key, value), owners in zip(values.items(), routing.owners(list(values)), strict=True):
            for node in owners:
                if node in missed.get(key, ()):
                    groups[node].append((key, value))
        for node, items in groups.items():
            member = routing.members[node]
            self.handoff_copies += len(items)
            self._pool().submit(_copy, member, items)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(PARALLEL_CALLS, thread_name_prefix="kvpool-client")
        return self._executor


def _drain(finishers: Iterable[Callable[[], object]]) -> None:
    """Wait for answers nobody will use, so that their connections go back to the pool."""
    for finish in list(finishers):
        try:
            finish()
        except Exception:
            continue


def _copy(member: Member, items: list[tuple[bytes, bytes]]) -> None:
    try:
        member.conn.put_many(items)
    except KVPoolError as exc:
        log.debug("handoff copy of %d values to %s failed: %s", len(items), member.info.node_id, exc)
