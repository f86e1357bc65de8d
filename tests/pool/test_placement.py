"""Rendezvous placement: balance, minimal movement, replicas, and the same answer in any process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from kvpool.cachenode.core.placement import Placement

KEYS = [f"chunk-{i}".encode() for i in range(100_000)]


def _nodes(n: int) -> list[str]:
    return [f"kvpool-node-{i}" for i in range(n)]


def _owner_of_each(placement: Placement, keys=KEYS) -> list[str]:
    return [o[0] for o in placement.owners_many(keys, 1)]  # the same as owner(), see below


@pytest.mark.parametrize("n", [3, 4, 7, 16])
def test_balance_within_ten_percent(n):
    placement = Placement(_nodes(n))
    counts = Counter(_owner_of_each(placement))
    fair = len(KEYS) / n
    assert set(counts) == set(placement.nodes)
    for node, count in counts.items():
        assert abs(count - fair) <= 0.10 * fair, (node, count, fair)


@pytest.mark.parametrize("n", [3, 8, 16])
def test_adding_a_node_moves_about_one_nth_and_only_to_it(n):
    before = _owner_of_each(Placement(_nodes(n)))
    after = _owner_of_each(Placement([*_nodes(n), "newcomer"]))
    moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
    assert all(after[i] == "newcomer" for i in moved)  # nothing moves between old nodes
    expected = len(KEYS) / (n + 1)
    assert abs(len(moved) - expected) <= 0.10 * expected


@pytest.mark.parametrize("n", [3, 8, 16])
def test_removing_a_node_moves_only_its_keys(n):
    nodes = _nodes(n)
    before = Placement(nodes)
    gone = nodes[1]
    after = Placement([x for x in nodes if x != gone])
    first, then = _owner_of_each(before), _owner_of_each(after)
    owned = [i for i in range(len(KEYS)) if first[i] == gone]
    moved = [i for i in range(len(KEYS)) if first[i] != then[i]]
    assert moved == owned
    assert abs(len(moved) - len(KEYS) / n) <= 0.10 * len(KEYS) / n
    # its keys go to the next node in rendezvous order
    assert all(after.owner(KEYS[i]) == before.ranked(KEYS[i])[1] for i in owned[:2000])


def test_replicas_are_distinct_ranked_and_capped():
    placement = Placement(_nodes(5))
    for key in KEYS[:2000]:
        ranked = placement.ranked(key)
        assert sorted(ranked) == sorted(placement.nodes)
        assert placement.owners(key, 1) == [placement.owner(key)] == ranked[:1]
        assert placement.owners(key, 3) == ranked[:3]
        assert placement.owners(key, 9) == ranked  # capped at the members
    with pytest.raises(ValueError):
        placement.owners(b"k", 0)
    assert Placement([]).owners(b"k", 2) == []
    with pytest.raises(LookupError):
        Placement([]).owner(b"k")


def test_replica_counts_are_balanced_too():
    placement = Placement(_nodes(4))
    counts = Counter(n for owners in placement.owners_many(KEYS[:40_000], 2) for n in owners)
    fair = 2 * 40_000 / 4
    assert all(abs(c - fair) <= 0.10 * fair for c in counts.values())


def test_order_of_node_ids_does_not_matter():
    nodes = _nodes(6)
    a, b = Placement(nodes), Placement(reversed(nodes))
    assert a == b
    assert all(a.ranked(k) == b.ranked(k) for k in KEYS[:5000])


def test_same_owners_in_another_process():
    """Hashes that differ between processes give zero cross-instance hits (ANCHORS.md)."""
    nodes = _nodes(5)
    sample = KEYS[::997]
    script = (
        "import json, sys\n"
        "from kvpool.cachenode.core.placement import Placement\n"
        "nodes, keys = json.load(sys.stdin)\n"
        "p = Placement(nodes)\n"
        "print(json.dumps([p.owners(k.encode(), 2) for k in keys]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", script],
        input=json.dumps([nodes, [k.decode() for k in sample]]),
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345"},  # a different salt for Python's own hash()
    )
    theirs = json.loads(out.stdout)
    mine = Placement(nodes)
    assert theirs == [mine.owners(k, 2) for k in sample]


@pytest.mark.parametrize("replicas", [1, 2, 3, 7])
def test_batched_scoring_gives_the_same_owners(replicas):
    placement = Placement(_nodes(6))
    keys = KEYS[:3000]
    assert placement.owners_many(keys, replicas) == [placement.owners(k, replicas) for k in keys]
    assert placement.owners_many(keys[:3], replicas) == [placement.owners(k, replicas) for k in keys[:3]]
    assert Placement([]).owners_many(keys[:20], replicas) == [[]] * 20
