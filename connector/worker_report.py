"""What a worker reports once vLLM has registered its KV cache: whether the connector can copy
its cache exactly (eligibility.py), and the model's identity by content that its chunk keys are
made under (model_identity.py). The scheduler keeps the cache off unless every worker's report
can be served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import blake3
import torch

from . import model_identity
from .eligibility import WorkerView, worker_layout
from .metadata import WorkerReport

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def attention_layer(vllm_config: VllmConfig, layer: str):
    try:
        return vllm_config.compilation_config.static_forward_context[layer]
    except Exception:
        return None


def is_causal(vllm_config: VllmConfig, layer: str) -> bool:
    """A decoder layer whose prefill is causal: a token's KV depends only on what precedes it
    (and on the multimodal inputs it belongs to, which the keys carry)."""
    attn = attention_layer(vllm_config, layer)
    if attn is None:
        return True  # no module to ask: the backend and shape checks still apply
    # AttentionType is a str enum: it compares equal to its value
    return "PrefixLM" not in type(attn).__name__ and getattr(attn, "attn_type", "decoder") == "decoder"


def backend_name(vllm_config: VllmConfig, layer: str) -> str | None:
    try:
        return attention_layer(vllm_config, layer).get_attn_backend().get_name()
    except Exception:
        return None


def kv_quant(vllm_config: VllmConfig, layers: list[str]) -> str | None:
    """ "none", or a digest of every layer's cache dtype and k/v scales: fp8 KV written with
    other scales holds other bytes for the same values. None when a quantised layer's scales
    are unknown: such a worker is refused (never shared under a fixed string)."""
    h = blake3.blake3(b"kvpool-kv-quant")
    quantised = False
    for name in layers:
        attn = attention_layer(vllm_config, name)
        dtype = str(getattr(attn, "kv_cache_dtype", vllm_config.cache_config.cache_dtype))
        h.update(f"{name}|{dtype}|".encode())
        if dtype != "auto":
            quantised = True
            for scale in ("_k_scale", "_v_scale"):
                t = getattr(attn, scale, None)
                if t is None:
                    return None
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32] if quantised else "none"


def identity(
    vllm_config: VllmConfig, layers: list[str], device: torch.device
) -> tuple[dict[str, str], str | None]:
    """The report's identity fields (start-up, before any request): the weights' digest
    (hashed once, cached on disk), software versions, compute capability, attention variant;
    or no fields and why, when the weights cannot be identified by content."""
    mc, lc = vllm_config.model_config, vllm_config.load_config
    try:
        if getattr(mc, "model_weights", ""):
            raise model_identity.UnknownWeights(
                f"weights streamed from {mc.model_weights} are not local files"
            )
        ident = model_identity.weights_identity(
            str(mc.model),
            revision=mc.revision,
            download_dir=getattr(lc, "download_dir", None),
            cache_file=model_identity.default_cache_file(),
        )
    except Exception as exc:
        return {}, f"the model's weights cannot be identified by content ({exc})"
    model_identity.log_identity(str(mc.model), ident)
    impls = [getattr(attention_layer(vllm_config, name), "impl", None) for name in layers]
    variants = {model_identity.attention_variant(impl) for impl in impls}
    fields = {
        "weights": ident.digest,
        **model_identity.software_versions(),
        "device_capability": model_identity.device_capability(device),
        "attn_variant": ",".join(sorted(v for v in variants if v)),
    }
    return fields, None


def worker_report(
    vllm_config: VllmConfig,
    layers: list[str],
    first: torch.Tensor,
    *,
    tp_rank: int | None,
    pp_rank: int | None,
    refusals: list[str],
) -> WorkerReport:
    """The report of a worker whose KV layers are ``layers`` (in model order; ``first`` is the
    first one's cache view). ``refusals`` are what the worker already knows it cannot serve."""
    from vllm.platforms import current_platform

    vc = vllm_config
    backend = backend_name(vc, layers[0])
    dtype = str(first.dtype).removeprefix("torch.")
    view = WorkerView(
        device=str(current_platform.device_type),
        backend=backend,
        view_shape=tuple(first.shape),
        view_dtype=dtype,
        num_layers=len(layers),
        model_layers=int(vc.model_config.get_num_layers(vc.parallel_config)),
        num_kv_heads=int(vc.model_config.get_num_kv_heads(vc.parallel_config)),
        head_dim=int(vc.model_config.get_head_size()),
        block_size=vc.cache_config.block_size,
        noncausal_layers=sum(not is_causal(vc, n) for n in layers),
    )
    kind, found = worker_layout(view)
    refusals = refusals + found
    quant = kv_quant(vc, layers)
    if quant is None:
        refusals.append("a quantised (fp8) KV cache without known k/v scales on some layer")
    fields, why = identity(vc, layers, first.device) if not refusals else ({}, None)
    if why:
        refusals.append(why)
    return WorkerReport(
        tp_rank=tp_rank,
        pp_rank=pp_rank,
        refusals=refusals,
        backend=backend or "",
        layout=kind or "",
        view_dtype=dtype,
        kv_quant=quant or "",
        num_layers=view.num_layers,
        num_kv_heads=view.num_kv_heads,
        head_dim=view.head_dim,
        identity=fields,
    )
