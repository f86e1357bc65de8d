"""Joining without misses (issue 22, item 6): nodes started on their own (no `--peers`), as
README's `Client("grpc://a,grpc://b,…")` allows, values stored through a client given a, b, c;
then d is added to the list. No node hands anything over here, so every hit on a moved key comes
from the client: the next node in rendezvous order (a new client) or the owner under the list it
had (the same client after `update_url`). The control turns that off and loses the moved keys."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client.routing import Routing
from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.placement import Placement
from kvpool.cli.devtools.local_servers import wait_port

from .conftest import Node, Pool, values, wait_until

COUNT = 240


class StandalonePool(Pool):
    """Nodes started on their own: no `--peers`, so no node knows another (with `alone` False,
    a node started lists every node added before it, as Pool does)."""

    alone = True

    def start(self, node: Node, *extra: str) -> Node:
        if not self.alone:
            return super().start(node, *extra)

        args = [
            sys.executable, "-P", "-m", "kvpool.cli.main", "node",
            "--host", "127.0.0.1", "--port", str(node.port), "--http-port", str(node.http_port),
            "--data-port", str(node.data_port), "--node-id", node.node_id,
            "--memory", "64MiB", "--log-level", "info", *self.extra, *extra,
        ]  # fmt: skip
        log = open(node.log, "a")  # noqa: SIM115 (handed to the child)
        node.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(node.port, proc=node.proc)
        return node


@pytest.fixture
def stored(tmp_path) -> Iterator[tuple[StandalonePool, dict[bytes, bytes], list[bytes]]]:
    """Nodes a, b, c, d running on their own; COUNT values stored through Client(a,b,c).
    Yields the pool, the values, and the keys d owns once it is in the list."""
    pool = StandalonePool(tmp_path)
    try:
        for _ in range(4):
            pool.start(pool.add())
        data = values("join", COUNT)
        with Client(pool.urls([0, 1, 2]), refresh_interval=0.5) as client:
            see_members(client, 3)
            client.put_many(data)
            assert client.get_many(list(data)) == data
        four = Placement(n.node_id for n in pool.nodes)
        moved = [k for k in data if four.owner(k) == pool.nodes[3].node_id]
        assert 30 < len(moved) < 100, len(moved)  # about a quarter
        yield pool, data, moved
    finally:
        pool.stop_all()


def see_members(client: Client, count: int) -> None:
    """Until the client knows every node it was given: a seed slow to answer its first call is
    learnt at a later refresh, and keys placed before then would go elsewhere."""
    wait_until(lambda: len(client.members()) == count, what=f"{count} members")


def fallback_metric(op: str, via: str) -> float:
    return metrics.CLIENT_FALLBACK_HITS.labels(op, via)._value.get()


def held_by(node: Node, keys: list[bytes]) -> int:
    conn = node.connection()
    try:
        return sum(conn.contains(keys))
    finally:
        conn.close()


def test_a_new_client_given_a_longer_list_finds_every_value(stored):
    pool, data, moved = stored
    keys = list(data)
    d = pool.nodes[3]
    # control: with the fallback off, the keys d now owns are misses (nothing was handed over)
    with Client(pool.urls(), miss_fallback_nodes=0, refresh_interval=0.5) as off:
        see_members(off, 4)
        found = off.get_many(keys)
        assert len(found) == COUNT - len(moved)
        assert off.prefix_hits(keys) < COUNT
        assert off.fallback_hits == 0
    assert held_by(d, moved) == 0

    before = fallback_metric("get", "next_node")
    with Client(pool.urls(), refresh_interval=0.5) as client:
        see_members(client, 4)
        assert client.get_many(keys) == data
        assert client.fallback_hits == len(moved)
        assert fallback_metric("get", "next_node") - before == len(moved)
        bufs = client.get_many_into(keys)  # the connector's receive path
        try:
            assert {k: bytes(b.view) for k, b in bufs.items()} == data
        finally:
            for b in bufs.values():
                b.release()
        assert client.get(moved[0]) == data[moved[0]]
        assert client.prefix_hits(keys) == COUNT
        assert client.contains(keys) == [True] * COUNT
        # a prefix counts only keys that are stored: a missing key ends it
        missing = b"join-never-stored"
        assert client.get(missing) is None
        assert client.prefix_hits([*moved[:5], missing, *moved[5:]]) == 5
        count, lease = client.lease_prefix(keys, 5000)
        assert count == COUNT and lease
        client.release(lease)
        # read repair: what was found at the next node is copied to d, its owner now
        wait_until(lambda: held_by(d, moved) == len(moved), what="copies to the new owner")


def test_the_same_client_after_its_list_grows_asks_the_owners_it_had(stored):
    pool, data, moved = stored
    keys = list(data)
    before = fallback_metric("get", "earlier_view")
    # next nodes off: the hits on moved keys can only come from the view the client had
    with Client(pool.urls([0, 1, 2]), miss_fallback_nodes=0, refresh_interval=0.5) as client:
        see_members(client, 3)
        assert client.get_many(keys) == data
        client.update_url(pool.urls())
        see_members(client, 4)
        bufs = client.get_many_into(keys)
        try:
            assert {k: bytes(b.view) for k, b in bufs.items()} == data
        finally:
            for b in bufs.values():
                b.release()
        assert client.fallback_hits == len(moved)
        assert fallback_metric("get", "earlier_view") - before == len(moved)
        assert client.prefix_hits(keys) == COUNT
        assert client.get_many(keys) == data


def test_a_client_given_a_node_the_peered_members_have_not_seen(tmp_path):
    """Peered a, b, c agree on their view (no next nodes asked: the common case costs nothing);
    d runs on its own, so a client given a, b, c, d asks the next nodes for what d now owns."""
    pool = StandalonePool(tmp_path)
    pool.alone = False
    try:
        pool.start_all(3)
        pool.alone = True
        d = pool.start(pool.add())
        data = values("mixed", COUNT)
        keys = list(data)
        with Client(pool.urls([0, 1, 2]), refresh_interval=0.5) as client:
            see_members(client, 3)
            assert client._membership.routing().unsettled == frozenset()
            client.put_many(data)
        moved = [k for k in keys if Placement(n.node_id for n in pool.nodes).owner(k) == d.node_id]
        assert moved
        with Client(pool.urls(), refresh_interval=0.5) as client:
            see_members(client, 4)
            assert client._membership.routing().unsettled == {n.node_id for n in pool.nodes}
            assert client.get_many(keys) == data
            assert client.fallback_hits == len(moved)
            assert client.prefix_hits(keys) == COUNT
    finally:
        pool.stop_all()


# -- the rule, without processes ------------------------------------------------------------
NODES = ("a", "b", "c", "d", "e")


def routing(unsettled: set[str], fallback: int, replicas: int = 1) -> Routing:
    return Routing({}, Placement(NODES), frozenset(NODES), (), replicas, frozenset(unsettled), fallback)


@pytest.mark.parametrize("replicas", [1, 2])
def test_next_nodes_are_asked_only_while_some_member_is_unsettled(replicas):
    keys = [f"k{i}".encode() for i in range(200)]
    ranked = [Placement(NODES).ranked(k) for k in keys]
    settled = routing(set(), 2, replicas).candidates(keys)
    assert settled == [r[:replicas] for r in ranked]  # the common case: owners only
    assert routing(set(NODES), 0, replicas).candidates(keys) == settled  # turned off
    everyone = routing(set(NODES), 2, replicas).candidates(keys)
    assert everyone == [r[: replicas + 2] for r in ranked]  # bounded by the setting
    # only d is new: keys whose owners are settled ask nobody else; the others ask one more
    only_d = routing({"d"}, 2, replicas).candidates(keys)
    for r, got in zip(ranked, only_d, strict=True):
        assert got == (r[: replicas + 1] if "d" in r[:replicas] else r[:replicas])


def test_unsettled_members_are_those_some_node_does_not_count():
    def report(node: str, *peers: str, state: str = ms.READY) -> ms.Report:
        info = ms.MemberInfo(node, "h", 1)
        return ms.Report(info, tuple(ms.MemberInfo(p, "h", 1, state=state) for p in peers))

    assert ms.unsettled([report("a", "b", "c"), report("b", "a", "c")]) == frozenset()
    assert ms.unsettled([report("a"), report("b"), report("c")]) == {"a", "b", "c"}
    assert ms.unsettled([report("a", "b", "c"), report("b", "a", "c"), report("d")]) == {"a", "b", "c", "d"}
    assert ms.unsettled([report("a", "b"), report("b", "a", "c", state=ms.STARTING)]) == {"a"}
