"""What the connector reads from vLLM's engine config: the engine's shape, which decides whether it
can be served at all (eligibility.py), and the model fingerprint its chunk keys are made under.

Both sides compute the fingerprint the same way (the scheduler from each worker's report, the
worker from its own), so it lives here rather than on either side.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import blake3

from kvpool.cachenode.core.settings import ConnectorSettings

from .eligibility import EngineShape
from .keys import ModelFingerprint
from .metadata import WorkerReport

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def config_digest(vllm_config: VllmConfig) -> str:
    """The model config as it shapes the KV (rope scaling, overrides, weight quantisation)."""
    mc = vllm_config.model_config
    cfg = getattr(mc, "hf_text_config", None) or mc.hf_config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    for name in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        d.pop(name, None)
    d["__quantization__"] = str(getattr(mc, "quantization", None))
    return blake3.blake3(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint_for(
    vllm_config: VllmConfig, settings: ConnectorSettings, report: WorkerReport
) -> ModelFingerprint:
    """The model fingerprint of one worker, computed identically by the scheduler (from the
    worker's report) and by the worker itself. The model is its weights' digest (the report's),
    never its path; ``model_id`` only adds a name (two names never share)."""
    from vllm.platforms import current_platform

    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    model_dtype = str(mc.dtype).removeprefix("torch.")
    kv_dtype = cc.cache_dtype if cc.cache_dtype != "auto" else model_dtype
    return ModelFingerprint(
        model=settings.model_id or "",
        revision="",  # the weights digest says which revision
        kv_dtype=str(kv_dtype),
        kv_layout=f"LKTHD/{current_platform.device_type}",
        num_layers=report.num_layers,
        num_kv_heads=report.num_kv_heads,
        head_dim=report.head_dim,
        chunk_size=settings.chunk_size,
        tp_rank=int(report.tp_rank or 0),
        tp_size=pc.tensor_parallel_size,
        pp_rank=int(report.pp_rank or 0),
        pp_size=pc.pipeline_parallel_size,
        attn_backend=report.backend,
        kv_quant=report.kv_quant,
        model_dtype=model_dtype,
        config_digest=config_digest(vllm_config),
        **{name: report.identity.get(name, "") for name in ModelFingerprint.IDENTITY_FIELDS},
    )


def engine_shape(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, s: ConnectorSettings
) -> EngineShape:
    """The engine as the eligibility checks see it, from the config alone (no worker needed)."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    groups = [] if kv_cache_config is None else kv_cache_config.kv_cache_groups
    spec = vllm_config.speculative_config
    return EngineShape(
        kv_group_specs=[type(g.kv_cache_spec).__name__ for g in groups] if groups else ["FullAttentionSpec"],
        use_mla=bool(getattr(mc, "use_mla", False)),
        encoder_decoder=bool(getattr(mc, "is_encoder_decoder", False)),
        cache_dtype=str(cc.cache_dtype),
        chunk_size=s.chunk_size,
        block_size=cc.block_size,
        tp=pc.tensor_parallel_size,
        pp=pc.pipeline_parallel_size,
        dcp=int(getattr(pc, "decode_context_parallel_size", 1) or 1),
        pcp=int(getattr(pc, "prefill_context_parallel_size", 1) or 1),
        speculative_method=None if spec is None else str(spec.method),
    )
