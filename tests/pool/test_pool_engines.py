"""Two real vLLM CPU engines sharing one pool of three `kvpool node` processes, each given the
node list in another order: the second engine loads what the first stored, from whichever node
holds each chunk, and every greedy output equals the cache-off output.

Three engine starts in two processes (the slow part): A stores; then B and a cache-off engine
run in one process. Prefix caching is off, so cached tokens can only come from the pool. A
negative control shows the comparison can fail: P1's real KV, planted under the keys of W (a
prompt no engine computed), is loaded by B and changes its answer.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool.cachenode import Client
from kvpool.connector.keys import chunk_keys

from ..connector.enginetools import fingerprints, payload, plant, tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]  # three engine starts: ~3.5 min on a busy 2-core box
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files (2 s deadlines)

C = 64
RUNNER = str(Path(__file__).parent.parent / "connector" / "engine_runner.py")


def _ids(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 1000) for _ in range(n)]


PROMPTS = {"P1": _ids(330, 31), "P2": _ids(330, 32), "P3": _ids(200, 33)}
STEPS = [{"name": name, "prompts": [ids]} for name, ids in PROMPTS.items()]
P_W = _ids(200, 34)  # the negative control: 3 chunks of P1's KV are planted under its keys
STEPS_W = [*STEPS, {"name": "W", "prompts": [P_W]}]
LOADABLE = {"P1": 320, "P2": 320, "P3": 192}  # full 64-token chunks


def _run(spec: dict, tmp: Path, name: str) -> list[dict]:
    spec["out"] = str(tmp / f"{name}.out.json")
    (tmp / f"{name}.json").write_text(json.dumps(spec))
    with open(tmp / f"{name}.log", "w") as log:
        rc = subprocess.run(
            [sys.executable, "-P", RUNNER, str(tmp / f"{name}.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
        ).returncode
    assert rc == 0, f"engine run {name} failed:\n{(tmp / f'{name}.log').read_text()[-4000:]}"
    return json.loads(Path(spec["out"]).read_text())["engines"]


def test_two_engines_share_a_three_node_pool(pool, tmp_path):
    model = tiny_model(tmp_path / "tiny-llama")
    nodes = pool.start_all(3)
    remote = {"chunk_size": C, "timeout_ms": 2000}
    (a,) = _run(
        {"model": model, "engines": [{"extra": {**remote, "url": pool.urls([0, 1, 2])}, "steps": STEPS}]},
        tmp_path,
        "A",
    )
    fp = fingerprints((tmp_path / "A.log").read_text())[(0, 0)]  # as engine A's scheduler logged it
    with Client(pool.urls()) as client:  # well-formed (key, header, checksum), wrong KV
        for source, target in zip(chunk_keys(fp, PROMPTS["P1"]), chunk_keys(fp, P_W), strict=False):
            plant(client, fp, target, payload(fp, source, client.get(source)))
    b, base = _run(
        {
            "model": model,
            "engines": [
                {"extra": {**remote, "url": pool.urls([2, 0, 1])}, "steps": STEPS_W},
                {"connector": False, "steps": STEPS_W},
            ],
        },
        tmp_path,
        "B",
    )
    for name in PROMPTS:
        assert a[name][0]["cached"] == 0, name  # A found nothing: it computed and stored
        assert b[name][0]["cached"] == LOADABLE[name], name  # B loaded every full chunk
        assert a[name][0]["tokens"] == b[name][0]["tokens"] == base[name][0]["tokens"], name
    # the negative control: B loaded the planted chunks, and its answer is not the cache-off one
    assert b["W"][0]["cached"] == 192 and b["W"][0]["tokens"] != base["W"][0]["tokens"]
    # the chunks are spread over the nodes, each on the node rendezvous hashing names
    assert fp.chunk_size == C
    keys = [k for ids in PROMPTS.values() for k in chunk_keys(fp, ids)]
    with Client(nodes[0].url) as client:
        assert client.prefix_hits(keys) == len(keys) == 13
        per_node = {n: s["tiers"]["memory"]["entries"] for n, s in client.stats()["nodes"].items()}
    assert sum(per_node.values()) == len(keys) + 3  # and W's 3 planted chunks
    assert sum(1 for count in per_node.values() if count) >= 2, per_node
