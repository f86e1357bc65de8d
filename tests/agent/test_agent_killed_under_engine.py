"""Issue 22, item 5: an agent SIGKILLed under a running vLLM engine, then restarted.

One real vLLM CPU engine (engine_session.py, driven step by step) whose connector uses a
`kvpool agent` in P2P mode (a lookup service, no cache nodes) through the agent's shared-memory
arena. The whole story runs on one engine:

1. *warm*: three prompts are computed and saved into the arena; *hit*: the same three load.
2. *kill*: four prompts (two that load, two new ones, long outputs) are running when the agent is
   SIGKILLed, once a chunk of a new prompt has landed in the arena (a barrier on the agent's state,
   not a sleep; the test checks the step had not finished then).
3. *dead*: prompts whose prefix was cached, one that was being saved at the kill, and a new one.
   All are computed (`cached == 0`): nothing else holds chunks (no nodes, no peer, vLLM's prefix
   cache off), and the connector reads the arena only at offsets the agent leased to it, which a
   dead agent does not do (a lease granted just before the kill is read from the arena the
   connector still maps, with the stored bytes: test_agent_killed_mid_transfer.py). The log shows
   that the connector's calls reached the dead agent and failed (SafePool: a miss).
4. The agent is restarted: same id, ports and arena directory, and a new, empty arena file. The
   same prompts are sent until the agent holds their chunks (the connector writes into the new
   arena), then they load from it.
5. A control: P1's real KV, planted at the restarted agent under the keys of P_W, which no engine
   computed, loads and changes P_W's output. So the equality checks below can fail.

Every output, of the kill and dead steps too, equals the same engine's output without a connector
token for token, and every request ran to its full length (none failed). At the end the restarted
agent has 0 pinned bytes and no lease left (lookup pins and arena leases), its arena usage is within
its budget, and its arena is the only file left in the arena directory.
"""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from kvpool.cachenode import Client
from kvpool.connector.keys import chunk_keys

from ..connector.enginetools import fingerprints, ids, loads, payload, plant, step_log, tiny_model
from .conftest import agent_stats, dump, wait_until
from .driven_engine import DrivenEngine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files

C = 64  # tokens per chunk
TOKENS = 32  # generated per request
LONG = 600  # generated per request of the kill step: the engine is still decoding at the kill
P = {i: ids(n, 60 + i) for i, n in {1: 330, 2: 330, 3: 200, 4: 330, 5: 330, 6: 260}.items()}
P_W = ids(200, 69)
CHUNKS = {i: len(p) // C for i, p in P.items()}  # full chunks: 5, 5, 3, 5, 5, 4
RESUME_WITHIN_S = 300  # generous: the connector's breaker skips a failing pool for 5 s


def held(agent, keys: list[bytes]) -> int:
    """How many leading `keys` the agent's arena holds (Locate without a pin)."""
    with agent.client() as client:
        return client.prefix_hits(keys)


def metric(agent, series: str, default: float | None = 0.0) -> float:
    """One series of the agent's /metrics (its HTTP port), e.g. `kvpool_pinned_bytes`; `default`
    when it is absent (a labelled counter appears at its first increment), None: required."""
    port = agent.args[agent.args.index("--http-port") + 1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert found or default is not None, f"{series} not in /metrics"
    return float(found.group(1)) if found else default


PUT_LEASES = 'kvpool_agent_arena_leases_total{kind="put"}'  # the connector reserved arena ranges


def test_agent_sigkilled_under_a_running_engine_then_restarted(cluster, lookup, tmp_path) -> None:
    model = tiny_model(tmp_path / "tiny-llama")
    # NIXL off: its idle progress thread would take a core from the engine on a 2-core machine
    a = cluster.agent("engine-a", "--nixl", "off", lookup=lookup)
    engine = DrivenEngine(model, {"chunk_size": C, "timeout_ms": 5000, "url": a.url}, tmp_path)
    got: dict[str, list[dict]] = {}
    figures: dict[str, object] = {}
    try:
        # 1. warm, then hits from the arena
        got["warm"] = engine.generate("warm", [P[1], P[2], P[3]], TOKENS)
        fp = fingerprints(engine.log())[(0, 0)]
        keys = {i: chunk_keys(fp, p) for i, p in P.items()}
        assert [len(keys[i]) for i in P] == [CHUNKS[i] for i in P]
        wait_until(
            lambda: [held(a, keys[i]) for i in (1, 2, 3)] == [5, 5, 3],
            timeout=60,
            what="the warm chunks saved",
        )
        got["hit"] = engine.generate("hit", [P[1], P[2], P[3]], TOKENS)

        # 2. the kill, while the engine runs: a chunk of P4 (new in this step) is in the arena
        engine.start("kill", [P[1], P[2], P[4], P[5]], LONG)
        with a.client() as poll:
            wait_until(lambda: engine.started("kill") and poll.prefix_hits(keys[4]) >= 1, timeout=600,
                       what="a chunk of the kill step saved", logs=engine.log)  # fmt: skip
            a.kill()
        figures["kill_landed_mid_step"] = not engine.done("kill")
        got["kill"] = engine.wait_file("kill")

        # 3. the agent is dead: everything is computed
        got["dead"] = engine.generate("dead", [P[1], P[3], P[4], P[6]], TOKENS)
        got["dead-again"] = engine.generate("dead-again", [P[1], P[6]], TOKENS)

        # 4. restarted: a new arena; the connector maps it and writes into it again. Until the
        # connector's breaker lets calls through again (5 s after the last failure), a step is
        # all misses and saves nothing (the agent grants no put lease): it is sent again
        restarted = time.monotonic()
        a.start()
        tries = 0
        while True:
            name = f"back-{tries}"
            got[name] = engine.generate(name, [P[1], P[2], P[6]], TOKENS)
            tries += 1
            if metric(a, PUT_LEASES) > 0:  # the connector's saves reach the new agent
                try:
                    wait_until(lambda: [held(a, keys[i]) for i in (1, 2, 6)] == [5, 5, 4], timeout=60,
                               what="the chunks saved after the restart")  # fmt: skip
                    break
                except AssertionError:  # a save of this step was skipped before the first got through
                    pass
            assert time.monotonic() - restarted < RESUME_WITHIN_S, (
                f"nothing saved after the restart\n{engine.log()[-6000:]}"
            )
            time.sleep(0.5)
        figures["steps_until_saved_after_restart"] = tries
        figures["seconds_from_restart_to_saved"] = round(time.monotonic() - restarted, 1)
        got["back-hit"] = engine.generate("back-hit", [P[1], P[2], P[6]], TOKENS)

        # 5. the control: well-formed chunks that hold another prompt's KV
        planted = chunk_keys(fp, P_W)
        with Client(a.url, timeout=10) as at_a:  # the agent serves the CacheNode API too
            for key, src in zip(planted, keys[1], strict=False):
                plant(at_a, fp, key, payload(fp, src, at_a.get(src)))
        assert held(a, planted) == 3
        got["W"] = engine.generate("W", [P_W], TOKENS)

        base = engine.baseline()  # shuts the connector's engine down first
        assert engine.exit() == 0, engine.log()[-6000:]
    finally:
        engine.kill()
    log = engine.log()
    print(dump(figures))

    # no request failed, and every output is the cache-off output
    for name, results in got.items():
        for j, (r, b) in enumerate(zip(results, base[name], strict=True)):
            want = LONG if name == "kill" else TOKENS
            assert len(b["tokens"]) == want and b["finish_reason"] == "length", (name, j, b)
            if name != "W":
                assert r["finish_reason"] == "length", (name, j, r)
                assert r["tokens"] == b["tokens"], (name, j, cluster.logs())

    assert "using agent engine-a through its shared-memory arena" in log
    assert [r["cached"] for r in got["warm"]] == [0, 0, 0]
    assert [r["cached"] for r in got["hit"]] == [320, 320, 192]
    assert figures["kill_landed_mid_step"], "the kill step had finished before the kill"
    # while the agent is dead: misses, because its calls fail (not because nothing was asked)
    assert [r["cached"] for r in got["dead"]] == [0, 0, 0, 0]
    assert [r["cached"] for r in got["dead-again"]] == [0, 0]
    after_kill = log.split("engine_runner: step kill\n", 1)[1].split("engine_runner: step back-0\n", 1)[0]
    failed = re.findall(rf"kvpool (\w+) on {re.escape(a.url)} failed \((\w+):", after_kill)
    assert failed, f"no call to the dead agent failed:\n{after_kill[-4000:]}"
    assert loads(step_log(log, "dead") + step_log(log, "dead-again")) == []  # no chunk loaded
    # after the restart: the new arena is empty (misses), then what was saved into it loads
    assert all(r["cached"] == 0 for i in range(tries) for r in got[f"back-{i}"])
    assert [r["cached"] for r in got["back-hit"]] == [320, 320, 256]
    # the control: the same comparison fails on well-formed but wrong KV
    assert got["W"][0]["cached"] == 192
    assert got["W"][0]["tokens"] != base["W"][0]["tokens"]

    # the restarted agent: no pin or lease left once the engine is gone, usage within budget
    def released() -> bool:
        s = agent_stats(a)
        return s["pinned_bytes"] == 0 and s["leases"] == 0 and s["agent"]["arena_leases"] == 0

    wait_until(released, timeout=60, what="every pin and lease ended", logs=lambda: dump(agent_stats(a)))
    stats = agent_stats(a)
    memory = stats["tiers"]["memory"]
    assert 0 < memory["used"] <= memory["capacity"], dump(stats)
    assert metric(a, "kvpool_pinned_bytes", None) == 0
    assert os.listdir(cluster.arena_dir) == ["kvpool-agent-engine-a.arena"]
    print(
        dump(
            {
                "failed_calls_while_dead": sorted(set(failed)),
                "agent": stats["agent"],
                "memory": memory,
            }
        )
    )
