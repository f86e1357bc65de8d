"""Model identity by content on the real vLLM CPU engine: the weights, not the path, decide which
chunks an engine may load.

One runner process, four engines in turn, an embedded pool whose disk dir they share (prefix
caching off, so every cached token came from the pool). Chunks are 64 tokens, blocks 32; every
request generates 32 tokens. The tiny model exists with two seeds (cli/devtools/tinymodel.py): W0 and
W1, same shapes, other weights.

Engines:  off  — no connector, W1: the cache-off reference outputs of W1.
          P0   — W0 at path P: stores the prompt's chunks (then hits them: the pool works).
          P1   — W1 written over P's weight file (a fine-tune over /models/llm): the same path
                 must get 0 hits (W0's KV would be wrong) and W1's cache-off output; it stores W1's.
          Q1   — W1 copied to another path Q: the same weights must hit what P1 stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from .enginetools import all_fingerprints, ids, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # one fixture starts every engine

C = 64
TOKENS = 32
PROMPT = ids(330, 201)  # 5 full chunks + a 10-token tail → 320 loadable
_WEIGHTS_LINE = re.compile(r"kvpool: weights of (\S+): (\S+) \(([^)]*)\)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from kvpool.cli.devtools.tinymodel import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("identity")
    w1 = ensure_tiny_model(tmp / "w1", seed=1)
    p = ensure_tiny_model(tmp / "llm", seed=0)  # the path whose weights get replaced
    q = tmp / "elsewhere" / "llm-copy"
    shutil.copytree(w1, q)  # W1 at another path
    digests = tmp / "weight-digests.json"
    extra = {"chunk_size": C, "disk_dir": str(tmp / "disk"), "disk_size": "256MiB", "memory": "128MiB"}
    weights = str(w1 / "model.safetensors")
    engines = [
        {"connector": False, "model": str(w1), "max_tokens": TOKENS, "steps": [{"name": "A", "prompts": [PROMPT]}]},
        {"model": str(p), "extra": extra, "max_tokens": TOKENS,
         "steps": [{"name": "A1", "prompts": [PROMPT]}, {"name": "A2", "prompts": [PROMPT]}]},
        {"model": str(p), "copy_files": [[weights, str(p / "model.safetensors")]], "extra": extra,
         "max_tokens": TOKENS, "steps": [{"name": "A", "prompts": [PROMPT]}]},
        {"model": str(q), "extra": extra, "max_tokens": TOKENS, "steps": [{"name": "A", "prompts": [PROMPT]}]},
    ]  # fmt: skip
    env = {**os.environ, "KVPOOL_WEIGHT_DIGEST_CACHE": str(digests)}
    results, log = run({"model": str(p), "engines": engines}, tmp, "identity", env=env)
    return {"off": results[0], "P0": results[1], "P1": results[2], "Q1": results[3], "log": log,
            "p": str(p), "q": str(q), "digests": digests}  # fmt: skip


def test_the_pool_serves_the_same_weights_at_the_same_path(runs):
    p0 = runs["P0"]
    assert p0["A1"][0]["cached"] == 0
    assert p0["A2"][0]["cached"] == 320  # positive control: W0's chunks are there
    assert p0["A1"][0]["tokens"] == p0["A2"][0]["tokens"]


def test_changed_weights_at_the_same_path_get_no_hits_and_the_cache_off_output(runs):
    reference = runs["off"]["A"][0]["tokens"]
    assert runs["P0"]["A1"][0]["tokens"] != reference  # W0 and W1 answer differently
    p1 = runs["P1"]["A"][0]
    assert p1["cached"] == 0  # W0's chunks sit in the pool under the same path: not loaded
    assert p1["tokens"] == reference


def test_the_same_weights_at_another_path_hit(runs):
    q1 = runs["Q1"]["A"][0]
    assert q1["cached"] == 320  # what P1 stored from W1, found by W1 at another path
    assert q1["tokens"] == runs["off"]["A"][0]["tokens"]


def test_each_engine_logged_its_weights_digest_once_at_start_up(runs):
    lines = _WEIGHTS_LINE.findall(runs["log"])
    assert [path for path, _d, _how in lines] == [runs["p"], runs["p"], runs["q"]]
    (_, w0, _), (_, w1_at_p, how_p1), (_, w1_at_q, how_q1) = lines
    assert w0.startswith("blake3:") and w0 != w1_at_p == w1_at_q
    assert "hashed" in how_p1 and "hashed" in how_q1  # new bytes at P, a new inode at Q
    fps = all_fingerprints(runs["log"])
    assert [fp.weights for fp in fps] == [w0, w1_at_p, w1_at_q]
    assert all(fp.model == "" and fp.vllm_version and fp.torch_version and fp.device_capability for fp in fps)
    assert fps[1] == fps[2]  # the path is not part of the identity
    cached = json.loads(runs["digests"].read_text())["files"]
    assert any(path.startswith(os.path.realpath(runs["q"])) for path in cached)
