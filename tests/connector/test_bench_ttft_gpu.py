"""`kvpool bench ttft`'s GPU figure (cli/bench/ttft_gpu.py), checked on the CPU with a small shape.

The figures mean nothing here; what is checked is the path: chunks saved out of a paged cache by
the connector's Saver, loaded back by its Loader, and a decode step over the loaded KV that gives
bit-identical logits. On a machine without CUDA, asking for the GPU figure is a clear error.
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
    for n in (256, 600):  # 600: two whole chunks cached, the rest recomputed
        assert out[f"gpu_outputs_identical_{n}"] is True
        assert out[f"gpu_load_ms_{n}"] > 0 and out[f"baseline_gpu_prefill_ms_{n}"] > 0
        assert out[f"ratio_gpu_ttft_{n}"] == pytest.approx(
            out[f"baseline_gpu_prefill_ms_{n}"] / (out[f"gpu_load_ms_{n}"] + out[f"gpu_decode_ms_{n}"])
        )
    if not torch.cuda.is_available():
        assert out["gpu_device"] == "cpu" and math.isnan(out["baseline_h2d_gbps_256"])


def test_a_load_that_writes_nothing_is_seen(monkeypatch):
    """The identity check can fail: a scatter that writes nothing leaves the cleared cache, whose
    decode logits differ from those over the prefill's KV."""
    from kvpool.connector import kvcopy

    monkeypatch.setattr(kvcopy, "scatter_chunks", lambda *args, **kwargs: "torch")
    model = ttft_gpu.Model(SMALL, torch.device("cpu"))
    out = ttft_gpu.measure_length(model, 256, 1, progress=lambda _m: None)
    assert out["gpu_outputs_identical_256"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("mode", ["on", "only"])
def test_asking_for_the_gpu_figure_without_a_gpu_is_a_clear_error(mode):
    result = CliRunner().invoke(ttft, ["--gpu", mode, "--json"])
    assert result.exit_code != 0
    assert f"--gpu {mode} needs a CUDA GPU" in result.output


def test_bad_lengths_are_refused_before_anything_runs():
    result = CliRunner().invoke(ttft, ["--gpu", "only", "--gpu-lengths", "4k"])
    assert result.exit_code == 2 and "--gpu-lengths" in result.output
