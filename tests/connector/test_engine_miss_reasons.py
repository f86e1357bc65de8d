"""Why a request missed, on a real vLLM CPU engine: kvpool_connector_miss_tokens_total{reason,
detail} and the request's hit-log line.

One engine (prefix caching off: every reuse comes from the pool) on a remote pool (`kvpool up`),
its stats on, the connector's counters read from the engine process's Prometheus registry after
each step (engine_runner.py, "metrics"). A 330-token prompt with chunk 64 has 5 full chunks (320
tokens) and a 10-token tail:
  cold    — A, the pool empty: 320 tokens not_in_pool, 10 partial_block;
  repeat  — A again once the pool holds its chunks: 320 loaded, 10 partial_block;
  corrupt — A again after a payload byte of its chunk 1 was flipped in the pool: chunk 0 loaded,
            256 tokens load_failed:corrupt, 10 partial_block;
  down    — B with the pool stopped: 320 tokens pool_unreachable, 10 partial_block.
Each step's counter differences must add up with the loaded tokens to the prompt's 330 tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector import chunkfmt
from kvpool.connector.keys import chunk_keys

from .enginetools import fingerprints, finish, ids, run, step_log, tiny_model, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

C = 64
P_A = ids(330, 91)
P_B = ids(330, 92)
MISS = "kvpool_connector_miss_tokens_total"
LOADED = "kvpool_connector_loaded_tokens_total{}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("missreasons")
    model = tiny_model(tmp / "tiny-llama")
    gates = {
        name: (str(tmp / f"{name}.ready"), str(tmp / f"{name}.go")) for name in ("repeat", "corrupt", "down")
    }
    with kvpool_up("--memory", "128MiB") as (pool_proc, url):
        engine = {
            "extra": {"chunk_size": C, "url": url, "timeout_ms": 500},
            "metrics": True,
            "max_tokens": 8,
            "steps": [
                {"name": "cold", "prompts": [P_A]},
                {"name": "repeat", "prompts": [P_A], "pause": gates["repeat"]},
                {"name": "corrupt", "prompts": [P_A], "pause": gates["corrupt"]},
                {"name": "down", "prompts": [P_B], "pause": gates["down"]},
            ],
        }
        spec = {"model": model, "engines": [engine]}
        proc = run(spec, tmp, "engine", wait=False)
        try:
            wait_for(gates["repeat"][0], proc, tmp, "engine")
            keys = chunk_keys(fingerprints((tmp / "engine.log").read_text())[(0, 0)], P_A)
            with Client(url, timeout=5) as c:
                deadline = time.time() + 60  # saves are written in the background
                while c.prefix_hits(keys) < len(keys):
                    assert time.time() < deadline, "the engine never stored A's chunks"
                    time.sleep(0.2)
                Path(gates["repeat"][1]).touch()
                wait_for(gates["corrupt"][0], proc, tmp, "engine")
                bad = bytearray(c.get(keys[1]))
                bad[chunkfmt.HEADER_SIZE + 100] ^= 0xFF
                c.put(keys[1], bytes(bad))
            Path(gates["corrupt"][1]).touch()
            wait_for(gates["down"][0], proc, tmp, "engine")
            pool_proc.terminate()
            pool_proc.wait(timeout=30)
            Path(gates["down"][1]).touch()
            (out,), log = finish(proc, spec, tmp, "engine")
        finally:
            if proc.poll() is None:
                proc.kill()
    return {"metrics": out["_metrics"], "log": log}


def _diff(runs, step: str, before: str | None) -> dict[str, float]:
    """Counter differences over ``step`` (snapshots after ``before`` and after ``step``)."""
    after = runs["metrics"][step]
    prior = runs["metrics"][before] if before else {}
    return {k: v - prior.get(k, 0.0) for k, v in after.items() if v - prior.get(k, 0.0)}


def _misses(diff: dict[str, float]) -> dict[str, float]:
    return {k[len(MISS) :]: v for k, v in diff.items() if k.startswith(MISS)}


def _adds_up(diff: dict[str, float], prompt: int) -> None:
    assert diff.get(LOADED, 0) + sum(_misses(diff).values()) == prompt, diff


def test_a_cold_request_misses_not_in_pool_and_its_tail(runs):
    diff = _diff(runs, "cold", None)
    assert _misses(diff) == {"{detail=,reason=not_in_pool}": 320, "{detail=,reason=partial_block}": 10}
    _adds_up(diff, 330)
    assert "Retrieved 0 of 330 tokens from grpc://" in step_log(runs["log"], "cold")
    assert "; missed 330: not_in_pool 320, partial_block 10" in step_log(runs["log"], "cold")


def test_a_repeat_loads_every_full_chunk_and_misses_only_its_tail(runs):
    diff = _diff(runs, "repeat", "cold")
    assert _misses(diff) == {"{detail=,reason=partial_block}": 10}
    assert diff[LOADED] == 320
    _adds_up(diff, 330)
    text = step_log(runs["log"], "repeat")
    assert "Retrieved 320 of 330 tokens (5 chunks)" in text
    assert "; missed 10: partial_block 10" in text


def test_a_corrupt_chunk_is_a_load_failed_miss(runs):
    diff = _diff(runs, "corrupt", "repeat")
    assert _misses(diff) == {"{detail=corrupt,reason=load_failed}": 256, "{detail=,reason=partial_block}": 10}
    assert diff[LOADED] == 64
    _adds_up(diff, 330)
    text = step_log(runs["log"], "corrupt")
    assert "Retrieved 64 of 330 tokens (1 chunks)" in text
    assert "256 tokens failed (load_failed:corrupt), recomputing; missed 266: load_failed:corrupt 256, " \
        "partial_block 10" in text  # fmt: skip


def test_a_stopped_pool_is_pool_unreachable(runs):
    diff = _diff(runs, "down", "corrupt")
    misses = _misses(diff)
    unreachable = {k: v for k, v in misses.items() if k.endswith("reason=pool_unreachable}")}
    assert sum(unreachable.values()) == 320 and len(unreachable) == 1, misses
    assert misses["{detail=,reason=partial_block}"] == 10 and len(misses) == 2, misses
    _adds_up(diff, 330)
    text = step_log(runs["log"], "down")
    assert "Retrieved 0 of 330 tokens from grpc://" in text
    assert "; missed 330: pool_unreachable:" in text and ", partial_block 10" in text
