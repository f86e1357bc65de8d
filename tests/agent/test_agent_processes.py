"""Real processes: a lookup service, cache nodes and agents. A chunk one agent admits is fetched by
another from it (with and without cache nodes), the arena outlives the process that wrote it, a
killed agent's entries vanish after its lease and its peers fall back to the nodes, a stopped agent
withdraws its entries at once, and a restarted lookup service rebuilds its index from the
agents' and nodes' snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cli.devtools.local_servers import kvpool_lookup

from .conftest import agent_stats, dump, holders, wait_until

pytestmark = pytest.mark.timeout(300)


def chunks(prefix: str, n: int, size: int = 256 * 1024) -> dict[bytes, bytes]:
    return {f"{prefix}-{i:04d}".encode().ljust(32, b"."): os.urandom(size + i) for i in range(n)}


def test_peer_fetch_with_nodes_then_fallback_to_the_nodes_when_the_peer_dies(cluster, lookup) -> None:
    n0, n1 = cluster.node("n0", lookup=lookup), cluster.node("n1", lookup=lookup)
    pool = f"{n0.url},{n1.url}"
    a = cluster.agent("agent-a", lookup=lookup, pool=pool)
    b = cluster.agent("agent-b", lookup=lookup, pool=pool)
    first, second = chunks("first", 6), chunks("second", 4)
    with a.client() as ca:
        assert ca.put_many({**first, **second}) == 10
    keys1, keys2 = list(first), list(second)
    # A publishes what it admitted; the nodes publish what A wrote through to them
    wait_until(lambda: holders(lookup, keys1 + keys2).get("agent-a") == 10, what="A in the index")
    with Client(pool, timeout=5) as nodes:
        wait_until(lambda: len(nodes.get_many(keys1 + keys2)) == 10, what="write-through", logs=cluster.logs)
        assert nodes.get_many(keys1 + keys2) == {**first, **second}
    wait_until(lambda: sum(v for k, v in holders(lookup, keys1).items() if k in ("n0", "n1")) == 6,
               what="nodes in the index", logs=cluster.logs)  # fmt: skip

    with b.client() as cb:
        assert cb.lease_prefix(keys1, 5000)[0] == 6  # counted from the index, before any byte moved
        assert cb.get_many(keys1) == first
        fetched = agent_stats(b)["agent"]["sources"]["fetched"]
        assert fetched == {"peer": 6, "pool": 0}, dump(fetched)  # from A, not from the nodes
        # B now holds them too, and says so
        wait_until(lambda: holders(lookup, keys1).get("agent-b") == 6, what="B in the index")

        a.kill()  # no goodbye: the index still names A until its lease (2 s) runs out
        assert cb.get_many(keys2) == second  # A is unreachable: the nodes deliver
        fetched = agent_stats(b)["agent"]["sources"]["fetched"]
        assert fetched == {"peer": 6, "pool": 4}, dump(fetched)
        wait_until(lambda: "agent-a" not in holders(lookup, keys1 + keys2), timeout=10, what="A's lease")
        assert cb.get_many(keys1 + keys2) == {**first, **second}  # now B's own


def test_peers_only_no_cache_nodes_and_the_arena_outlives_its_writer(cluster, lookup, tmp_path) -> None:
    a = cluster.agent("agent-a", lookup=lookup)
    b = cluster.agent("agent-b", lookup=lookup)
    data = chunks("only-peers", 5)
    # the connector that writes is another process, which then exits (a vLLM container restarting)
    script = tmp_path / "writer.py"
    script.write_text(
        textwrap.dedent(f"""
        from kvpool.cachenode.client.agent import AgentClient
        data = {{bytes.fromhex(k): bytes.fromhex(v) for k, v in { ({k.hex(): v.hex() for k, v in data.items()})!r}.items()}}
        with AgentClient({a.url!r}) as client:
            assert client.put_many(data) == len(data)
    """)
    )
    subprocess.run([sys.executable, "-P", str(script)], check=True, timeout=60)
    with a.client() as ca:
        assert ca.get_many(list(data)) == data  # from A's arena: its writer is gone
        assert agent_stats(a)["agent"]["sources"]["fetched"] == {"peer": 0, "pool": 0}
    wait_until(lambda: holders(lookup, list(data)).get("agent-a") == 5, what="A in the index")
    with b.client() as cb:
        assert cb.prefix_hits(list(data)) == 5
        assert cb.get_many(list(data)) == data
        assert cb.get_many([b"never-stored".ljust(32, b".")]) == {}
    assert agent_stats(b)["agent"]["sources"]["fetched"] == {"peer": 5, "pool": 0}


def test_a_stopped_agent_withdraws_its_entries_and_its_connector_maps_the_new_arena(cluster, lookup) -> None:
    a = cluster.agent("agent-a", lookup=lookup)
    data = chunks("restart", 3)
    with a.client() as ca:
        ca.put_many(data)
        wait_until(lambda: holders(lookup, list(data)).get("agent-a") == 3, what="A in the index")
        assert a.terminate() == 0
        # SIGTERM: A published its evictions before it went; nothing waits for the lease
        assert "agent-a" not in holders(lookup, list(data))
        old_arena = ca.attach().arena_id
        a.start()  # same id, same port: a new arena (its chunks died with the old process)
        assert ca.get_many(list(data)) == {}
        assert ca.put_many(data) == 3  # the lease names the new arena: the client maps it and goes on
        assert ca.attach().arena_id != old_arena
        assert ca.get_many(list(data)) == data
    assert sorted(os.listdir(cluster.arena_dir)) == ["kvpool-agent-agent-a.arena"]


def test_a_restarted_lookup_service_rebuilds_its_index_from_the_agents_and_nodes(cluster) -> None:
    with kvpool_lookup("--holder-lease", "2", "--rebuild-window", "0") as first:
        port, http_port = first.port, first.http_port
        n0 = cluster.node("n0", lookup=first.url)
        a = cluster.agent("agent-a", lookup=first.url, pool=n0.url)
        b = cluster.agent("agent-b", lookup=first.url, pool=n0.url)
        data = chunks("rebuild", 4)
        with a.client() as ca:
            assert ca.put_many(data) == 4
        expected = {"agent-a": 4, "n0": 4}  # A's arena, and what A wrote through to the node
        wait_until(lambda: holders(first.url, list(data)) == expected, what="A and n0 in the index")
        first.proc.kill()  # the index dies with the process
        first.proc.wait(timeout=10)
    resyncs = agent_stats(a)["lookup"]["resyncs"]
    with kvpool_lookup(
        "--holder-lease", "2", "--rebuild-window", "1", port=port, http_port=http_port
    ) as second:
        # every holder hears "unknown holder" at its next heartbeat and sends a full snapshot
        wait_until(
            lambda: holders(second.url, list(data)) == expected, what="the rebuilt index", logs=cluster.logs
        )
        with LookupClient(second.url) as client:
            wait_until(lambda: client.locate(list(data)).authoritative, what="the end of the rebuild window")
        assert agent_stats(a)["lookup"]["resyncs"] > resyncs
        with b.client() as cb:
            assert cb.get_many(list(data)) == data
        assert agent_stats(b)["agent"]["sources"]["fetched"] == {"peer": 4, "pool": 0}  # found A again


def test_agents_serve_from_their_arenas_and_the_nodes_while_the_lookup_service_stays_down(cluster) -> None:
    """Issue 22, item 5: the lookup service SIGKILLed and left down. Nothing fails: an agent that
    cannot ask where a chunk is fetches it from the cache nodes, and every agent keeps serving and
    admitting its own chunks."""
    with kvpool_lookup("--holder-lease", "2", "--rebuild-window", "0") as lookup:
        n0 = cluster.node("n0", lookup=lookup.url)
        a = cluster.agent("agent-a", lookup=lookup.url, pool=n0.url)
        b = cluster.agent("agent-b", lookup=lookup.url, pool=n0.url)
        data = chunks("no-lookup", 4)
        with a.client() as ca:
            assert ca.put_many(data) == 4
        with Client(n0.url, timeout=5) as nodes:
            wait_until(lambda: nodes.get_many(list(data)) == data, what="write-through", logs=cluster.logs)
        lookup.proc.kill()
        lookup.proc.wait(timeout=10)
    with b.client() as cb:
        started = time.monotonic()
        got = cb.get_many(list(data))
        assert time.monotonic() - started < 10  # a refused lookup costs no wait (10 s: a loaded CI)
        assert got == data  # 0 wrong bytes, no error
        assert agent_stats(b)["agent"]["sources"]["fetched"] == {"peer": 0, "pool": 4}  # from the node
        assert cb.get_many(list(data)) == data  # now from B's own arena
    more = chunks("no-lookup-more", 2)
    with a.client() as ca:
        assert ca.get_many(list(data)) == data  # A's arena, as before
        assert ca.put_many(more) == 2  # and A admits new chunks with no index to tell
        assert ca.get_many(list(more)) == more
