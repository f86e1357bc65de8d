"""End to end: two real vLLM CPU engines, each with its own agent, share KV peer to peer.

Engine A's connector writes into agent A's arena; agent A publishes to the lookup service. Engine
B's connector asks agent B, which finds the chunks at agent A through the lookup service and
fetches them — there are no cache nodes, so only a peer can deliver. Every greedy output (32
tokens) equals the cache-off output. Negative control: another prompt's real KV, well-formed,
planted at agent A under the keys of a prompt no engine computed, reaches engine B the same way
and changes its output, so the equality above can fail.

Three engine starts in one runner process (A, B, cache off), B paused before its first step while
the control's chunks are planted. Prefix caching is off, so cached tokens can only come through
the agents.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvpool.cachenode import Client
from kvpool.connector.keys import chunk_keys

from ..connector.enginetools import fingerprints, finish, ids, payload, plant, run, tiny_model, wait_for
from .conftest import agent_stats, holders, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files

C = 64
TOKENS = 32  # generated per request
PROMPTS = {"P1": ids(330, 41), "P2": ids(330, 42), "P3": ids(200, 43)}
LOADABLE = {"P1": 320, "P2": 320, "P3": 192}  # full 64-token chunks
P_W = ids(200, 44)  # never computed before B: P1's real KV is planted at agent A under its keys
STEPS = [{"name": name, "prompts": [ids_]} for name, ids_ in PROMPTS.items()]


def test_two_engines_with_their_own_agents_share_kv_peer_to_peer(cluster, lookup, tmp_path) -> None:
    model = tiny_model(tmp_path / "tiny-llama")
    # no --pool-url: peers only. NIXL off: its idle progress thread would take a core from the
    # engines on a 2-core machine; peers then read over the TCP data channel.
    a = cluster.agent("engine-a", "--nixl", "off", lookup=lookup)
    b = cluster.agent("engine-b", "--nixl", "off", lookup=lookup)
    extra = {"chunk_size": C, "timeout_ms": 5000}
    ready, go = str(tmp_path / "b.ready"), str(tmp_path / "b.go")
    b_steps = [{**STEPS[0], "pause": [ready, go]}, *STEPS[1:], {"name": "W", "prompts": [P_W]}]
    spec = {
        "model": model,
        "engines": [
            {"extra": {**extra, "url": a.url}, "max_tokens": TOKENS, "steps": STEPS},
            {"extra": {**extra, "url": b.url}, "max_tokens": TOKENS, "steps": b_steps},
            {"connector": False, "max_tokens": TOKENS, "steps": [*STEPS, {"name": "W", "prompts": [P_W]}]},
        ],
    }
    proc = run(spec, tmp_path, "engines", wait=False)
    try:
        wait_for(ready, proc, tmp_path, "engines")  # A is done; B is built, before its first request
        fp = fingerprints((tmp_path / "engines.log").read_text())[(0, 0)]
        keys = {name: chunk_keys(fp, p) for name, p in PROMPTS.items()}
        all_keys = [k for ks in keys.values() for k in ks]
        wait_until(
            lambda: holders(lookup, all_keys) == {"engine-a": len(all_keys)}, what="A's chunks indexed"
        )
        planted = chunk_keys(fp, P_W)
        with Client(a.url, timeout=10) as at_a:  # the agent serves the CacheNode API too
            for key, src in zip(planted, keys["P1"], strict=False):
                plant(at_a, fp, key, payload(fp, src, at_a.get(src)))
        wait_until(lambda: holders(lookup, planted) == {"engine-a": 3}, what="the planted chunks indexed")
        Path(go).touch()
        (first, second, base), log = finish(proc, spec, tmp_path, "engines")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    for name in PROMPTS:
        assert first[name][0]["cached"] == 0, name  # A found nothing: it computed and stored
        assert second[name][0]["cached"] == LOADABLE[name], (name, cluster.logs())
        assert len(base[name][0]["tokens"]) == TOKENS, name
        assert first[name][0]["tokens"] == second[name][0]["tokens"] == base[name][0]["tokens"], name
    # the control: B loaded 3 well-formed chunks from A that hold the wrong prompt's KV
    assert second["W"][0]["cached"] == 192
    assert second["W"][0]["tokens"] != base["W"][0]["tokens"]

    assert log.count("through its shared-memory arena") >= 2  # the connectors used the arenas, not gRPC
    chunks = len(all_keys) + 3
    stats_b = agent_stats(b)
    assert stats_b["agent"]["sources"]["fetched"] == {"peer": chunks, "pool": 0}, stats_b["agent"]
    assert stats_b["tiers"]["memory"]["entries"] == chunks  # B keeps what it fetched, and publishes it
    assert agent_stats(a)["tiers"]["memory"]["entries"] == chunks
    wait_until(lambda: holders(lookup, all_keys).get("engine-b") == len(all_keys), what="B's copies indexed")
