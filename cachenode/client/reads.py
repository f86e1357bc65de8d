"""Reading values from the pool: each key from its owners, then from where else it may be.

A key's candidates (routing.py) are its owners, its owners under earlier views, and — while some
member is not in every node's view — the next nodes in rendezvous order. Each round asks every
key's next candidate, one request per node, in parallel, so a miss at the owner costs one more
round trip to the node that had it, never one per key. What is found away from an owner that
missed is copied to that owner in the background (a read repair: keys name their content, so the
copy cannot be stale) and counted (`FanOut.count_fallbacks`). A node that fails is a miss there,
not an error.
"""

from __future__ import annotations

from collections import defaultdict

from kvpool.cachenode.client.fanout import FanOut
from kvpool.cachenode.client.membership import Membership
from kvpool.cachenode.core.errors import Unavailable


def get_found(membership: Membership, fanout: FanOut, keys: list[bytes], into: bool, found: dict) -> dict:
    """Fill `found` with the values of `keys` that the pool holds (buffers when `into`); the
    caller releases them if this raises."""
    routing = membership.routing(require_writable=False)
    tried: dict[bytes, set[str]] = defaultdict(set)
    missed: dict[bytes, list[str]] = defaultdict(list)  # nodes that answered "not here"
    found_at: dict[bytes, str] = {}  # keys found after a miss, and where
    candidates = dict(zip(keys, routing.candidates(keys), strict=True))
    todo = keys
    for _ in range(2 + 2 * len(routing.members)):
        groups: dict[str, list[bytes]] = defaultdict(list)
        for key in todo:
            node = next((n for n in candidates[key] if n not in tried[key]), None)
            if node is not None:
                groups[node].append(key)
        if not groups:
            break
        results, failed = fanout.run(
            routing, groups, lambda m, ks: m.conn.get_many_into(ks) if into else m.conn.get_many(ks)
        )
        for node, ks in groups.items():
            got = results.get(node)
            for key in ks:
                tried[key].add(node)
                if got is None:
                    continue
                value = got.get(key)
                if value is None:
                    missed[key].append(node)
                else:
                    found[key] = value
                    if key in missed:
                        found_at[key] = node
        todo = [k for k in todo if k not in found]
        if failed and todo:
            routing = membership.routing(require_writable=False)
            candidates.update(zip(todo, routing.candidates(todo), strict=True))
    if found_at:
        fanout.count_fallbacks(routing, found_at, "get")
        # pooled buffers go back to the caller, who may release them before a background copy
        # runs: copy those bytes now (once per key that moved)
        copies = {k: (bytes(found[k].view) if into else found[k]) for k in found_at}
        fanout.copy_to_new_owners(routing, copies, missed)
    return {k: found[k] for k in keys if k in found}


def get_into(membership: Membership, fanout: FanOut, key: bytes, buffer) -> int | None:
    """One value straight into `buffer`; its size, or None."""
    routing = membership.routing(require_writable=False)
    tried: set[str] = set()
    missed: list[str] = []
    for _ in range(2 + 2 * len(routing.members)):
        node = next((n for n in routing.candidates([key])[0] if n not in tried), None)
        if node is None:
            return None
        tried.add(node)
        member = routing.members[node]
        try:
            size = member.conn.get_into(key, buffer)
        except Unavailable as exc:
            membership.failed(member, exc)
            routing = membership.routing(require_writable=False)
            continue
        member.breaker.record_success()
        if size is None:
            missed.append(node)
            continue
        if missed:
            fanout.count_fallbacks(routing, {key: node}, "get")
            value = bytes(memoryview(buffer).cast("B")[:size])
            fanout.copy_to_new_owners(routing, {key: value}, {key: missed})
        return size
    return None
