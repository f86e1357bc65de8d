"""Which engines and workers the connector can serve exactly; pure (plain values in, reasons out).

The scheduler decides before its first lookup (``engine_refusals`` from the config, then the
workers' ``worker_refusals`` reported through vLLM's handshake), so an engine the connector cannot
serve never looks up, loads or stores anything: a refusal is a log line and a cache that is off,
never a failed load and a recompute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Attention backends whose per-layer cache view the connector can copy exactly, and the paged
#: layout adapter (paged.py) for each. In vLLM 0.32 FLASH_ATTN, FLASHINFER and TRITON_ATTN share
#: one logical view: ``[blocks, kv_heads, block_tokens, 2*head_dim]`` with each token row K | V.
BACKEND_LAYOUTS = {
    "CPU_ATTN": "cpu",
    "FLASH_ATTN": "flash",
    "FLASHINFER": "flash",
    "TRITON_ATTN": "flash",
}

#: Speculative methods that add no KV cache layers (the drafter keeps no KV of its own).
KV_FREE_SPECULATORS = frozenset({"ngram", "ngram_gpu", "suffix", "medusa", "mlp_speculator"})

#: View dtypes a chunk can carry (chunkfmt.DTYPES); uint8 is how some backends hold fp8 caches.
VIEW_DTYPES = frozenset({"float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "uint8"})

#: Cache dtypes whose bytes are plain values (or fp8 with per-layer scales): a chunk is an exact
#: copy. Others (per-token-head quantisation, NVFP4, TurboQuant, …) pack scales or other state
#: into the page in layouts the connector does not copy.
CACHE_DTYPES = frozenset({"auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"})


@dataclass(frozen=True)
class EngineShape:
    """What the scheduler knows from the vLLM config alone."""

    kv_group_specs: Sequence[str]  # class name of each KV cache group's spec
    use_mla: bool
    encoder_decoder: bool
    cache_dtype: str
    chunk_size: int
    block_size: int
    tp: int = 1
    pp: int = 1
    dcp: int = 1
    pcp: int = 1
    speculative_method: str | None = None


def engine_refusals(e: EngineShape) -> list[str]:
    """Why the connector cannot serve this engine at all (empty: it can, pending the workers)."""
    out = []
    if e.chunk_size % e.block_size:
        out.append(f"chunk_size {e.chunk_size} is not a multiple of block_size {e.block_size}")
    if e.use_mla or any("MLA" in s for s in e.kv_group_specs):
        out.append("MLA models (one latent KV tensor per layer) are not supported yet")
    elif len(e.kv_group_specs) != 1:
        out.append(
            f"{len(e.kv_group_specs)} KV cache groups ({', '.join(e.kv_group_specs) or 'none'}): "
            "hybrid models (sliding window + full attention, Mamba) are not supported yet"
        )
    elif e.kv_group_specs[0] != "FullAttentionSpec":
        out.append(f"KV cache spec {e.kv_group_specs[0]} (only full attention is supported)")
    if e.encoder_decoder:
        out.append("encoder-decoder models are not supported")
    if e.cache_dtype not in CACHE_DTYPES:
        out.append(f"KV cache dtype {e.cache_dtype} is not supported")
    if e.dcp > 1 or e.pcp > 1:
        out.append("context parallelism (the KV of one request split across ranks) is not supported")
    if e.speculative_method and e.speculative_method not in KV_FREE_SPECULATORS:
        out.append(
            f"speculative decoding with '{e.speculative_method}' (its drafter keeps KV that depends on "
            "sampled tokens) is not supported"
        )
    return out


@dataclass(frozen=True)
class WorkerView:
    """What one worker sees once vLLM has allocated its KV cache."""

    device: str  # "cpu" or "cuda", …
    backend: str | None  # attention backend name, None if it could not be determined
    view_shape: tuple[int, ...]  # the first layer's cache view
    view_dtype: str
    num_layers: int  # KV cache layers registered with the connector
    model_layers: int  # attention layers of the model on this pipeline stage
    num_kv_heads: int  # per worker
    head_dim: int
    block_size: int
    noncausal_layers: int = 0  # layers whose prefill attends to later prompt tokens (prefix LM)


def worker_layout(w: WorkerView) -> tuple[str | None, list[str]]:
    """The paged layout adapter for this worker, or the reasons it cannot be served."""
    out = []
    layout = BACKEND_LAYOUTS.get(w.backend or "")
    if w.backend is None:
        out.append("the attention backend could not be determined")
    elif layout is None:
        out.append(f"attention backend {w.backend} is not supported")
    elif (layout == "cpu") != (w.device == "cpu"):
        out.append(f"attention backend {w.backend} on device {w.device}")
    if len(w.view_shape) != 4:
        out.append(f"KV cache view of {len(w.view_shape)} dims {tuple(w.view_shape)} (expected 4)")
    else:
        _blocks, heads, tokens, content = w.view_shape
        if heads != w.num_kv_heads or content != 2 * w.head_dim:
            out.append(
                f"KV cache view {tuple(w.view_shape)} does not hold {w.num_kv_heads} heads of K|V "
                f"with head dim {w.head_dim} (quantisation scales or padding in the page?)"
            )
        if tokens <= 0 or w.block_size % tokens:
            out.append(f"kernel block of {tokens} tokens does not divide block_size {w.block_size}")
    if w.view_dtype not in VIEW_DTYPES:
        out.append(f"KV cache dtype {w.view_dtype} is not supported")
    if w.noncausal_layers:
        out.append(
            f"{w.noncausal_layers} layers attend to later prompt tokens (prefix-LM prefill): a chunk's "
            "KV would depend on text after it"
        )
    if w.num_layers != w.model_layers:
        out.append(
            f"{w.num_layers} KV cache layers for {w.model_layers} model layers "
            "(a drafter or shared-KV layers?)"
        )
    return (layout if not out else None), out
