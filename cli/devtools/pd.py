"""Measure disaggregated prefill through a pool: the decode engine's TTFT for a prompt a prefill
engine computed, against the same engine computing the prompt itself (cache off).

Three engines with the same settings, built in turn on this machine, and a `kvpool up` pool in its
own process: the baseline (no connector) times each prompt's prefill; the prefill engine
(``kv_producer``) computes each prompt once with max_tokens=1, as a router sends it, and keeps the
``kv_transfer_params`` it answers with; the decode engine (``kv_consumer``) then gets each prompt
with those params, as a router forwards them, and its TTFT is timed (median of ``repeats``: a
consumer stores nothing, so every sample loads the prompt from the pool again). The prefill
engine is shut down (its saves flushed) before the decode engine starts, so the figure leaves out
a wait for chunks still being stored. Imports vLLM lazily (vLLM spawns processes: call from a
``__main__``-guarded entry point).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from .local_servers import kvpool_up
from .ttft import (
    _is_cpu,
    build_engine,
    close_engine,
    generate,
    kv_bytes_per_token,
    pool_memory_for,
    prompt_ids,
    same_cpu_threads,
    ttft,
    vllm_device,
)

TOKENS = 16  # generated to compare outputs


def run_pd_bench(
    model: str, lengths: list[int], repeats: int = 5, progress: Callable[[str], None] = print
) -> dict[str, float | bool | str]:
    prompts = {n: prompt_ids(model, n, seed=300 + n) for n in lengths}
    result: dict[str, float | bool | str] = {"vllm_device": vllm_device()}
    if _is_cpu():
        result["cpu_reserved_cores"] = same_cpu_threads()
    max_len = max(lengths) + 64
    memory = pool_memory_for(lengths, kv_bytes_per_token(model), floor=256 << 20)
    result["pool_memory_bytes"] = memory

    progress("starting vLLM engine (cache off)…")
    llm = build_engine(model, connector=False, max_model_len=max_len)
    reference = {}
    for n, ids in prompts.items():
        ttft(llm, ids)  # warm-up of this shape
        result[f"baseline_ttft_ms_{n}"] = 1000 * statistics.median(ttft(llm, ids)[0] for _ in range(repeats))
        reference[n] = list(generate(llm, ids, TOKENS).outputs[0].token_ids)
    close_engine(llm)

    with kvpool_up("--memory", str(memory)) as (_proc, url):
        extra = {"url": url, "timeout_ms": 5000}
        progress("starting the prefill engine (kv_producer)…")
        llm = build_engine(model, connector=True, extra=extra, max_model_len=max_len, role="kv_producer")
        transfer = {}
        for n, ids in prompts.items():
            seconds, out = ttft(llm, ids, transfer={"do_remote_decode": True})
            result[f"prefill_ms_{n}"] = 1000 * seconds
            transfer[n] = out.kv_transfer_params
            result[f"announced_chunks_{n}"] = ((out.kv_transfer_params or {}).get("kvpool") or {}).get(
                "chunks", 0
            )
        close_engine(llm)  # its saves are flushed at shutdown

        progress("starting the decode engine (kv_consumer)…")
        llm = build_engine(model, connector=True, extra=extra, max_model_len=max_len, role="kv_consumer")
        identical = True
        for n, ids in prompts.items():
            ttft(llm, ids, transfer=transfer[n])  # warm-up of this shape (a load, as every sample)
            samples = [ttft(llm, ids, transfer=transfer[n]) for _ in range(repeats)]
            result[f"pd_ttft_ms_{n}"] = 1000 * statistics.median(s[0] for s in samples)
            cached = min(s[1].num_cached_tokens for s in samples)
            result[f"loaded_share_{n}"] = cached / n
            result[f"ratio_pd_ttft_{n}"] = result[f"baseline_ttft_ms_{n}"] / result[f"pd_ttft_ms_{n}"]
            out = generate(llm, ids, TOKENS, transfer=transfer[n])
            identical &= list(out.outputs[0].token_ids) == reference[n]
        close_engine(llm)
    result["outputs_identical"] = identical
    return result
