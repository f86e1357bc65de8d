"""Measure what the cache buys on a real vLLM engine: TTFT with a warm pool vs the cache off.

Shared by ``kvpool demo`` and ``kvpool bench ttft``. Two engines with the same settings are built
in turn — one without the connector (the baseline), one with it and an embedded pool — and the
same prompts go through both. vLLM's own prefix cache is off in both, so every reused token comes
from kvpool (as it would for another engine, or after a restart). Imports vLLM lazily: call from
a ``__main__``-guarded entry point (vLLM spawns processes).
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable

from .miss_overhead import BLOCK, CHUNK, miss_figures


def build_engine(
    model: str,
    connector: bool,
    extra: dict | None = None,
    max_model_len: int = 8192,
    log_stats: bool = False,
    role: str = "kv_both",
):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = {}
    if connector:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVPoolConnector",
            kv_connector_module_path="kvpool.connector.vllm",
            kv_role=role,
            kv_connector_extra_config={"chunk_size": CHUNK, **(extra or {})},
        )
    cpu = _is_cpu()
    if cpu:
        same_cpu_threads()
    return LLM(
        model=model,
        enable_prefix_caching=False,
        block_size=BLOCK if cpu else 16,
        max_model_len=max_model_len,
        seed=0,
        max_num_seqs=4,
        # eager on the CPU (start-up time); on a GPU the engine keeps its CUDA graphs, the
        # best-practice baseline a user runs
        enforce_eager=cpu,
        disable_log_stats=not log_stats,
        **({"kv_cache_memory_bytes": 512 << 20} if cpu else {"gpu_memory_utilization": 0.8}),
        **kwargs,
    )


def vllm_device() -> str:
    """Where this vLLM runs ("cpu", "cuda", …): the figures are that device's."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def kv_bytes_per_token(model: str) -> int:
    """KV bytes one token takes in the pool (all layers, keys and values), from the model's config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = str(getattr(cfg, "dtype", None) or "bfloat16")
    width = 4 if "float32" in dtype else 2
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * width


def pool_memory_for(lengths: list[int], per_token: int, floor: int = 2 << 30) -> int:
    """An embedded pool that holds every prompt of the run with a quarter to spare, so the warm
    path measures loads, not evictions (an 8B model's 32k-token prompt alone is 4 GiB of KV)."""
    return max(floor, int(1.25 * sum(lengths) * per_token))


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def same_cpu_threads() -> int:
    """Give both engines the same OpenMP threads. vLLM's CPU backend reserves one core more for an
    engine with a KV connector than for one without, so on a small machine the connector's engine
    would run more threads than the baseline (2 against 1 on 2 cores): a stronger engine, not a
    cache, would then lift the ratio. Both reserve what the baseline reserves by default (one
    core), unless VLLM_CPU_NUM_OF_RESERVED_CPU is set. Without it the outputs can differ too: a
    different thread count sums in another order, which flips greedy near-ties."""
    return int(os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"))


def close_engine(llm) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def sampling(max_tokens: int, transfer: dict | None = None):
    """Greedy sampling; ``transfer``: the request's kv_transfer_params (disaggregated prefill)."""
    from vllm import SamplingParams

    extra = {"extra_args": {"kv_transfer_params": transfer}} if transfer else {}
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


def ttft(llm, ids: list[int], salt: str | None = None, transfer: dict | None = None) -> tuple[float, object]:
    """Seconds to the first token (a 1-token generation) and its output."""
    prompt = {"prompt_token_ids": ids, **({"cache_salt": salt} if salt else {})}
    t0 = time.perf_counter()
    out = llm.generate([prompt], sampling(1, transfer), use_tqdm=False)[0]
    return time.perf_counter() - t0, out


def generate(llm, ids: list[int], max_tokens: int = 16, transfer: dict | None = None):
    out = llm.generate([{"prompt_token_ids": ids}], sampling(max_tokens, transfer), use_tqdm=False)
    return out[0]


def miss_overhead_ms(n_tokens: int = 4096, repeats: int = 200) -> float:
    """The connector's time on vLLM's scheduler thread for a request the pool does not hold
    (median ms; miss_overhead.py says how it is measured)."""
    return miss_figures(n_tokens, repeats)["connector_miss_overhead_ms"]


def prompt_ids(model: str, n_tokens: int, seed: int) -> list[int]:
    """Token ids of deterministic pseudo-text, from the model's tokenizer."""
    from transformers import AutoTokenizer

    from kvpool.cli.devtools.tinymodel import corpus

    tok = AutoTokenizer.from_pretrained(model)
    ids: list[int] = []
    words = n_tokens
    while len(ids) < n_tokens:
        ids = tok.encode(corpus(words, seed=seed), add_special_tokens=False)
        words *= 2
    return ids[:n_tokens]


def run_ttft_bench(
    model: str, lengths: list[int], repeats: int = 5, progress: Callable[[str], None] = print
) -> dict[str, float]:
    """Median TTFT per prompt length: cache off (baseline engine) vs a warm pool (connector)."""
    prompts = {n: prompt_ids(model, n, seed=100 + n) for n in lengths}
    result: dict[str, float] = {}
    if _is_cpu():
        result["cpu_reserved_cores"] = same_cpu_threads()
    result["vllm_device"] = vllm_device()
    memory = pool_memory_for(lengths, kv_bytes_per_token(model))
    result["pool_memory_bytes"] = memory
    progress("starting vLLM engine (cache off)…")
    llm = build_engine(model, connector=False, max_model_len=max(lengths) + 64, log_stats=True)
    base_out = {}
    for n, ids in prompts.items():
        ttft(llm, ids)  # warm-up of this shape
        result[f"baseline_ttft_ms_{n}"] = 1000 * statistics.median(ttft(llm, ids)[0] for _ in range(repeats))
        base_out[n] = generate(llm, ids).outputs[0].token_ids
    close_engine(llm)
    progress("starting vLLM engine (kvpool connector, embedded pool)…")
    llm = build_engine(
        model, connector=True, extra={"memory": memory}, max_model_len=max(lengths) + 64, log_stats=True
    )
    identical = True
    for n, ids in prompts.items():
        ttft(llm, ids)  # stores the prompt's chunks: the pool is warm from here on
        samples = [ttft(llm, ids) for _ in range(repeats)]
        result[f"ttft_ms_{n}"] = 1000 * statistics.median(s[0] for s in samples)
        result[f"cached_tokens_{n}"] = samples[-1][1].num_cached_tokens
        result[f"ratio_ttft_{n}"] = result[f"baseline_ttft_ms_{n}"] / result[f"ttft_ms_{n}"]
        identical &= list(generate(llm, ids).outputs[0].token_ids) == list(base_out[n])
    result.update(engine_lookup_figures())
    close_engine(llm)
    result["outputs_identical"] = identical
    result.update(miss_figures())
    return result


def engine_lookup_figures() -> dict[str, float]:
    """The connector engine's lookups over the whole run (its warm-up and first requests, which
    miss, included), from the ``kvpool_connector_*`` series vLLM's stats path fed into this
    process's Prometheus registry: how often a request was told "not known yet" and waited a
    step, and how long the scheduler waited for lookups."""
    from prometheus_client import REGISTRY

    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name.startswith("kvpool_connector_"):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    waits = totals.get("kvpool_connector_lookup_wait_seconds_count", 0.0)
    return {
        "engine_requests": totals.get("kvpool_connector_requests_total", 0.0),
        "engine_lookups": totals.get("kvpool_connector_lookups_total", 0.0),
        "engine_lookup_skipped_steps": totals.get("kvpool_connector_lookup_skipped_steps_total", 0.0),
        "engine_lookup_wait_ms_mean": (
            1000 * totals.get("kvpool_connector_lookup_wait_seconds_sum", 0.0) / waits if waits else 0.0
        ),
    }
