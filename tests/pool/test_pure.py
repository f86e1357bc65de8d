"""The pure parts of a pool: merging member reports and planning a handoff."""

from __future__ import annotations

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.core.placement import Placement
from kvpool.cachenode.server.handoff import plan

KEYS = [f"chunk-{i}".encode() for i in range(3000)]


def _member(node: str, state: str = ms.READY, incarnation: int = 1, host: str = "10.0.0.1") -> ms.MemberInfo:
    return ms.MemberInfo(node, host, 7400, 7402, 7401, state, incarnation)


def test_a_node_is_the_authority_on_itself():
    a_says = ms.Report(_member("a"), peers=(_member("b", ms.DOWN, 5, "10.0.0.9"),))
    b_says = ms.Report(_member("b", ms.LEAVING, 5, "10.0.0.2"), peers=(_member("a", ms.DOWN),))
    merged = ms.merge([a_says, b_says])
    assert merged["a"].state == ms.READY
    assert merged["b"] == _member("b", ms.LEAVING, 5, "10.0.0.2")


def test_hearsay_prefers_the_newer_incarnation_then_a_reachable_state():
    reports = [
        ms.Report(_member("a"), peers=(_member("c", ms.DOWN, 3, "old"),)),
        ms.Report(_member("b"), peers=(_member("c", ms.READY, 4, "new"),)),
    ]
    assert ms.merge(reports)["c"].host == "new"
    assert ms.merge(reversed(reports))["c"].host == "new"
    same = [
        ms.Report(_member("a"), peers=(_member("c", ms.DOWN, 4),)),
        ms.Report(_member("b"), peers=(_member("c", ms.READY, 4),)),
    ]
    assert ms.merge(same)["c"].state == ms.READY


def test_leaving_node_pushes_what_it_owned_to_the_next_node():
    old, new = Placement(["a", "b", "c"]), Placement(["a", "b"])
    work = plan(KEYS, old, new, "c", replicas=1)
    mine = [k for k in KEYS if old.owner(k) == "c"]
    assert sorted(k for keys in work.values() for k in keys) == sorted(mine)
    assert all(new.owner(k) == node for node, keys in work.items() for k in keys)
    assert plan(KEYS, old, new, "a", replicas=1) == {}  # a stays and its keys stay with it


def test_with_two_replicas_only_the_owner_that_lacks_a_key_gets_it():
    old, new = Placement(["a", "b", "c", "d"]), Placement(["a", "b", "c"])
    work = plan(KEYS, old, new, "d", replicas=2)
    for node, keys in work.items():
        for key in keys:
            assert "d" in old.owners(key, 2)
            assert node in new.owners(key, 2) and node not in old.owners(key, 2)
    assert sum(map(len, work.values())) == sum(1 for k in KEYS if "d" in old.owners(k, 2))


def test_on_a_join_exactly_one_old_owner_pushes_each_key_to_the_newcomer():
    old, new = Placement(["a", "b", "c"]), Placement(["a", "b", "c", "n"])
    for replicas in (1, 2):
        pushed: list[bytes] = []
        for me in ("a", "b", "c"):
            work = plan(KEYS, old, new, me, replicas)
            assert set(work) <= {"n"}
            pushed.extend(work.get("n", []))
        gained = [k for k in KEYS if "n" in new.owners(k, replicas)]
        assert sorted(pushed) == sorted(gained)  # each once
