"""Which nodes hold a chunk: rendezvous (highest-random-weight) hashing over stable node ids.

Pure: no I/O, no clocks. Every client and every node computes the same owners from the same set
of node ids, in any process: the score of (key, node) is fmix64(xxh3_64(key) XOR xxh3_64(node id)),
fmix64 being MurmurHash3's 64-bit finalizer (never Python's `hash()`, which is salted per
process). Hashing the key once and mixing it with each node's seed lets a batch of keys be scored
for every node at once with numpy; `owners_many` and `owners` give the same answer.

Why rendezvous rather than a ring: no virtual nodes to tune, balance within a few per cent at any
node count, and when a node joins or leaves only the keys it gains or loses move — every other
key keeps its owner, because each node's score for a key does not depend on the other nodes.
The owners of a key are the `replicas` nodes with the highest scores; removing a node promotes
the next one in that same order ("its keys go to the next node in rendezvous order").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import xxhash

_hash = xxhash.xxh3_64_intdigest
_MASK = (1 << 64) - 1
_C1, _C2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53
_NP_C1, _NP_C2, _NP_33 = np.uint64(_C1), np.uint64(_C2), np.uint64(33)
BATCH_MIN = 8  # from this many keys on, numpy scores them faster than a Python loop


def node_seed(node_id: str) -> int:
    """The 64-bit seed a node's scores are computed with."""
    return _hash(node_id.encode())


def score(key: bytes, seed: int) -> int:
    """The rendezvous weight of `key` on the node with `seed`."""
    return _fmix(_hash(key) ^ seed)


def _fmix(x: int) -> int:
    x ^= x >> 33
    x = (x * _C1) & _MASK
    x ^= x >> 33
    x = (x * _C2) & _MASK
    return x ^ (x >> 33)


class Placement:
    """An immutable node set; ask it for a key's owners. Node ids are sorted, so ties (which
    need two equal 64-bit scores) go to the same node everywhere: the lower id wins."""

    __slots__ = ("_np_seeds", "_seeds", "nodes")

    def __init__(self, node_ids: Iterable[str]) -> None:
        self.nodes: tuple[str, ...] = tuple(sorted(set(node_ids)))
        if any(not n for n in self.nodes):
            raise ValueError("node ids must be non-empty")
        self._seeds = [node_seed(n) for n in self.nodes]
        self._np_seeds = np.array(self._seeds, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and other.nodes == self.nodes

    def __hash__(self) -> int:
        return hash(self.nodes)

    def __repr__(self) -> str:
        return f"Placement({list(self.nodes)})"

    def owner(self, key: bytes) -> str:
        """The node with the highest score for `key` (the first owner)."""
        if not self._seeds:
            raise LookupError("no nodes to place keys on")
        h = _hash(key)
        scores = [_fmix(h ^ seed) for seed in self._seeds]
        return self.nodes[scores.index(max(scores))]

    def ranked(self, key: bytes) -> list[str]:
        """Every node, best first: the owners, then the nodes that take over if owners go."""
        h = _hash(key)
        scores = [_fmix(h ^ seed) for seed in self._seeds]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.nodes[i] for i in order]

    def owners(self, key: bytes, replicas: int) -> list[str]:
        """The `replicas` best nodes for `key` (fewer when there are fewer nodes)."""
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        if replicas == 1:
            return [self.owner(key)] if self._seeds else []
        return self.ranked(key)[:replicas]

    def owners_many(self, keys: Sequence[bytes], replicas: int) -> list[list[str]]:
        """`owners(key, replicas)` for each key, scored in one go."""
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {replicas}")
        if not self._seeds:
            return [[] for _ in keys]
        if len(keys) < BATCH_MIN:
            return [self.owners(k, replicas) for k in keys]
        scores = (
            np.fromiter((_hash(k) for k in keys), dtype=np.uint64, count=len(keys))[:, None] ^ self._np_seeds
        )
        scores ^= scores >> _NP_33
        scores *= _NP_C1
        scores ^= scores >> _NP_33
        scores *= _NP_C2
        scores ^= scores >> _NP_33
        nodes = self.nodes
        if replicas == 1:
            return [[nodes[i]] for i in scores.argmax(axis=1).tolist()]
        order = np.argsort(~scores, axis=1, kind="stable")[:, :replicas]  # ~x: descending, ties by index
        return [[nodes[i] for i in row] for row in order.tolist()]
