"""`kvpool bench ttft`'s GPU figure (cli/bench/ttft_gpu.py), checked on the CPU with a small shape.

The figures mean nothing here; what is checked is the path: a prompt of exactly the length asked
for, its whole chunks saved out of a paged cache by the connector's Saver into a real `kvpool up`
node, found by a leased lookup, loaded back by the Loader through the kvpool client, and the rest
of the prompt computed over the loaded KV with bit-identical logits. On a machine without CUDA,
asking for the GPU figure is a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from kvpool.cli.bench import ttft_gpu
from kvpool.cli.bench.ttft import ttft

SMALL = ttft_gpu.Shape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=512)


def test_the_gpu_figure_path_loads_exactly_what_prefill_wrote():
    out = ttft_gpu.run([256, 600], repeats=1, progress=lambda _m: None, shape=SMALL)
    # 600: two whole chunks loaded, the partial third computed; 256: one whole chunk, loaded up to
    # the last block (one block of prompt tokens is left to compute, as vLLM leaves one token)
    for n, cached in ((256, 240), (600, 512)):
        assert out[f"gpu_prompt_tokens_{n}"] == n
        assert out[f"gpu_cached_tokens_{n}"] == cached and out[f"gpu_computed_tokens_{n}"] == n - cached
        per_token = SMALL.layers * 2 * SMALL.kv_heads * SMALL.head_dim * 2  # bf16
        assert out[f"gpu_loaded_bytes_{n}"] == cached * per_token
        assert 0 < out[f"gpu_lookup_ms_{n}"] <= out[f"gpu_load_ms_{n}"]
        assert out[f"gpu_outputs_identical_{n}"] is True
        assert out[f"gpu_load_ms_{n}"] > 0 and out[f"baseline_gpu_prefill_ms_{n}"] > 0
        assert out[f"ratio_gpu_ttft_{n}"] == pytest.approx(
            out[f"baseline_gpu_prefill_ms_{n}"] / (out[f"gpu_load_ms_{n}"] + out[f"gpu_decode_ms_{n}"])
        )
    if not torch.cuda.is_available():
        assert out["gpu_device"] == "cpu" and math.isnan(out["baseline_h2d_gbps_256"])
        assert out["gpu_attention"] == "sdpa enable_gqa"


def test_a_prompt_in_steps_gives_the_logits_of_its_prefill():
    """The warm path's attention (new tokens over cached ones, causal aligned to the end) is the
    prefill's: computing a prompt in two steps over the paged cache gives the same logits as one
    step, with SDPA's grouped-query heads and with the heads repeated."""
    from kvpool.cli.bench.ttft_gpu_model import REPEAT

    model = ttft_gpu.Model(SMALL, torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(0, SMALL.vocab, (100,), generator=torch.Generator().manual_seed(3))
    kv = ttft_gpu.PagedKV(SMALL, 100, torch.device("cpu"), torch.float32)
    whole = model.forward(ids, 0, kv)
    kv.clear()
    model.forward(ids[:64], 0, kv)
    assert torch.allclose(model.forward(ids[64:], 64, kv), whole, atol=1e-5)
    model.attention = REPEAT
    assert torch.allclose(model.forward(ids[64:], 64, kv), whole, atol=1e-5)
    kv.clear()
    assert not torch.allclose(model.forward(ids[64:], 64, kv), whole, atol=1e-5)  # no cached KV


def test_a_load_that_writes_nothing_is_seen(monkeypatch):
    """The identity check can fail: a scatter that writes nothing leaves the cleared cache, whose
    decode logits differ from those over the prefill's KV."""
    from kvpool.connector import kvcopy

    monkeypatch.setattr(kvcopy, "scatter_chunks", lambda *args, **kwargs: "torch")
    model = ttft_gpu.Model(SMALL, torch.device("cpu"))
    out = ttft_gpu.measure_length(model, 256, 1, progress=lambda _m: None)
    assert out["gpu_cached_tokens_256"] == 240 and out["gpu_outputs_identical_256"] is False


def test_a_prompt_shorter_than_a_chunk_is_computed_whole():
    """Nothing to store or load: the warm path is the whole prefill, and its length is the prompt's."""
    with ttft_gpu.node_pool(1 << 20) as pool:
        out = ttft_gpu.measure_length(
            ttft_gpu.Model(SMALL, torch.device("cpu")), 100, 1, lambda _m: None, pool
        )
    assert out["gpu_prompt_tokens_100"] == 100 and out["gpu_computed_tokens_100"] == 100
    assert out["gpu_cached_tokens_100"] == 0 and out["gpu_outputs_identical_100"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("mode", ["on", "only"])
def test_asking_for_the_gpu_figure_without_a_gpu_is_a_clear_error(mode):
    result = CliRunner().invoke(ttft, ["--gpu", mode, "--json"])
    assert result.exit_code != 0
    assert f"--gpu {mode} needs a CUDA GPU" in result.output


def test_bad_lengths_are_refused_before_anything_runs():
    result = CliRunner().invoke(ttft, ["--gpu", "only", "--gpu-lengths", "4k"])
    assert result.exit_code == 2 and "--gpu-lengths" in result.output
