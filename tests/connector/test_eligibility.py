"""Which engines and workers the connector serves; everything else is refused up front."""

from __future__ import annotations

import pytest

from kvpool.connector.eligibility import EngineShape, WorkerView, engine_refusals, worker_layout

ENGINE = EngineShape(
    kv_group_specs=["FullAttentionSpec"], use_mla=False, encoder_decoder=False, cache_dtype="auto",
    chunk_size=256, block_size=16,
)  # fmt: skip


def _engine(**kw) -> EngineShape:
    return EngineShape(**{**ENGINE.__dict__, **kw})


def test_a_plain_decoder_engine_is_served():
    assert engine_refusals(ENGINE) == []
    assert engine_refusals(_engine(cache_dtype="fp8_e4m3", tp=4, pp=2, speculative_method="ngram")) == []


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"use_mla": True}, "MLA"),
        ({"kv_group_specs": ["MLAAttentionSpec"]}, "MLA"),
        ({"kv_group_specs": ["FullAttentionSpec", "SlidingWindowSpec"]}, "hybrid"),
        ({"kv_group_specs": ["SlidingWindowSpec"]}, "SlidingWindowSpec"),
        ({"kv_group_specs": ["MambaSpec"]}, "MambaSpec"),
        ({"encoder_decoder": True}, "encoder-decoder"),
        ({"cache_dtype": "nvfp4"}, "nvfp4"),
        ({"cache_dtype": "int8_per_token_head"}, "int8_per_token_head"),
        ({"dcp": 2}, "context parallelism"),
        ({"speculative_method": "eagle3"}, "eagle3"),
        ({"speculative_method": "draft_model"}, "draft_model"),
        ({"chunk_size": 250}, "multiple of block_size"),
    ],
)
def test_engines_the_connector_cannot_copy_exactly_are_refused(change, reason):
    refusals = engine_refusals(_engine(**change))
    assert refusals and reason in " ".join(refusals)


VIEW = WorkerView(
    device="cuda", backend="FLASH_ATTN", view_shape=(1000, 8, 16, 256), view_dtype="bfloat16",
    num_layers=32, model_layers=32, num_kv_heads=8, head_dim=128, block_size=16,
)  # fmt: skip


def _view(**kw) -> WorkerView:
    return WorkerView(**{**VIEW.__dict__, **kw})


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"])
def test_gpu_backends_with_the_kv_row_layout_are_served(backend):
    assert worker_layout(_view(backend=backend)) == ("flash", [])
    assert worker_layout(_view(backend=backend, view_dtype="float8_e4m3fn")) == ("flash", [])
    assert worker_layout(_view(backend=backend, view_dtype="uint8")) == ("flash", [])


def test_cpu_backend_and_kernel_blocks_smaller_than_the_manager_block():
    cpu = _view(device="cpu", backend="CPU_ATTN", view_shape=(1000, 8, 32, 256), block_size=64)
    assert worker_layout(cpu) == ("cpu", [])


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"backend": None}, "could not be determined"),
        ({"backend": "FLASHMLA"}, "FLASHMLA"),
        ({"backend": "CPU_ATTN"}, "on device cuda"),
        ({"view_shape": (1000, 16, 576)}, "3 dims"),  # an MLA latent cache
        ({"view_shape": (1000, 8, 16, 264)}, "scales or padding"),  # per-token-head fp8 scales
        ({"view_shape": (1000, 4, 16, 256)}, "8 heads"),
        ({"view_shape": (1000, 8, 24, 256)}, "does not divide"),
        ({"view_dtype": "int8"}, "int8"),
        ({"num_layers": 33}, "drafter"),
        ({"noncausal_layers": 32}, "prefix-LM"),
    ],
)
def test_workers_the_connector_cannot_copy_exactly_are_refused(change, reason):
    layout, refusals = worker_layout(_view(**change))
    assert layout is None and reason in " ".join(refusals)
