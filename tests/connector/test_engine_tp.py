"""Tensor parallelism (TP=2) on the real vLLM CPU engine: one rank's failed load stores nothing.

One TP=2 engine reaches a `kvpool up` through faultproxy.py. It reads a 5-chunk prompt once (cache
miss: the reference output and, once saved, the reference bytes of every chunk of both ranks).
Then chunks 3-4 are deleted and, between the next lookup and its load, rank 1's shard of chunk 1:
rank 0 loads chunks 0-2 fine, rank 1 does not. vLLM recomputes from chunk 1 on both ranks; the
step that failed also completed chunks 3-4, over the missing KV, on both ranks. Afterwards the
output is identical and the pool holds exactly the reference bytes for every chunk of both ranks:
no rank stored a shard computed over the other rank's missing KV. Every output is compared with a
cache-off TP=2 engine's (a second engine of the same runner process), and a negative control shows
the comparison can fail: rank 0's real KV planted under rank 1's keys changes the answer.

The two workers start in about two minutes here; the scheduler-side decision itself is also
unit-tested in test_scheduler_logic.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector.keys import chunk_keys

from .enginetools import fault_proxy, fingerprints, finish, ids, payload, plant, run, tiny_model, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # one fixture starts the engine

C = 64
P = ids(330, 201)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    model = tiny_model(tmp / "tiny-llama")
    faults = tmp / "faults.json"
    out: dict = {}
    # vLLM's CPU workers bind to one NUMA node each by default; a small CI machine has one.
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    with kvpool_up("--memory", "256MiB") as (_pool, url), fault_proxy(url, faults, tmp) as proxy:
        pause1 = [str(tmp / "1.ready"), str(tmp / "1.go")]
        pause2 = [str(tmp / "2.ready"), str(tmp / "2.go")]
        steps = [
            {"name": "clean", "prompts": [P]},
            {"name": "failed", "prompts": [P], "pause": pause1},
            {"name": "after", "prompts": [[3, 4, 5]], "pause": pause2},
            {"name": "wrong", "prompts": [P]},  # rank 1 loads rank 0's KV (planted at pause 2)
        ]
        extra = {"chunk_size": C, "url": proxy, "timeout_ms": 2000}
        off = {"tp": 2, "connector": False, "max_tokens": 32, "steps": [{"name": "ref", "prompts": [P]}]}
        spec = {"model": model, "engines": [{"tp": 2, "extra": extra, "max_tokens": 32, "steps": steps}, off]}
        proc = run(spec, tmp, "tp2", wait=False, env=env)
        wait_for(pause1[0], proc, tmp, "tp2")
        fps = fingerprints((tmp / "tp2.log").read_text())
        keys = {rank: chunk_keys(fps[(rank, 0)], P) for rank in (0, 1)}
        out["keys"] = keys
        with Client(url, timeout=5) as c:
            out["ref"] = {rank: [c.get(k) for k in keys[rank]] for rank in (0, 1)}
            c.delete(keys[0][3:] + keys[1][3:])
        faults.write_text(json.dumps({"delete_on_get": [keys[1][1].hex()]}))
        Path(pause1[1]).touch()
        wait_for(pause2[0], proc, tmp, "tp2")
        with Client(url, timeout=5) as c:
            out["after"] = {rank: [c.get(k) for k in keys[rank]] for rank in (0, 1)}
            stats = c.stats()
            out["pinned"] = (stats["pinned_bytes"], stats["leases"])
            # negative control: rank 0's real KV, well-formed under rank 1's keys (key, header, checksum)
            for k0, k1 in zip(keys[0], keys[1], strict=True):
                plant(c, fps[(1, 0)], k1, payload(fps[(0, 0)], k0, c.get(k0)))
        Path(pause2[1]).touch()
        (out["tp2"], out["off"]), out["log"] = finish(proc, spec, tmp, "tp2")
    return out


def test_each_rank_keys_and_stores_its_own_shard(runs):
    ref = runs["ref"]
    assert None not in ref[0] and None not in ref[1]
    assert runs["keys"][0] != runs["keys"][1]
    assert all(a != b for a, b in zip(ref[0], ref[1], strict=True))  # different heads' KV


def test_one_ranks_failed_load_recomputes_on_both_and_the_answer_is_unchanged(runs):
    e, ref = runs["tp2"], runs["off"]["ref"][0]["tokens"]
    assert e["clean"][0]["cached"] == 0
    assert len(ref) == 32
    assert e["clean"][0]["tokens"] == ref  # the cache-off TP=2 engine's answer
    assert e["failed"][0]["tokens"] == ref
    log = runs["log"]
    assert "Retrieved 192 of 330 tokens (3 chunks)" in log  # rank 0: all three
    assert "Retrieved 64 of 330 tokens (1 chunks)" in log  # rank 1: chunk 1 was gone
    assert "Recovered from KV load failure" in log  # vLLM rescheduled the request


def test_negative_control_the_other_ranks_kv_changes_the_answer(runs):
    """The equality above can fail: with rank 0's KV planted as rank 1's, the engine loads every
    full chunk and answers differently from the cache-off engine."""
    wrong = runs["tp2"]["wrong"][0]
    assert wrong["cached"] == 320
    assert wrong["tokens"] != runs["off"]["ref"][0]["tokens"]


def test_no_rank_stored_a_shard_computed_over_the_missing_kv(runs):
    """Chunks 3-4 were completed in the failed step on both ranks; what the pool holds now for
    every chunk of both ranks is byte for byte the clean run's save."""
    for rank in (0, 1):
        assert runs["after"][rank] == runs["ref"][rank], f"rank {rank}"


def test_every_lease_was_released(runs):
    assert runs["pinned"] == (0, 0)
