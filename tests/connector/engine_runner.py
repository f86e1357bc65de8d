"""Run a real vLLM CPU engine through a list of steps; write what happened as JSON.

Started as a subprocess by test_engine.py (vLLM spawns processes, so this needs its own main).
Each step sends token-id prompts (so chunk boundaries are exact) with greedy sampling and records
prompt length, ``num_cached_tokens`` and the output tokens. One process may build several engines
in turn (``engines``), sharing the slow imports.

Spec: {"model": path, "out": path, "engines": [{"connector": bool, "extra": {...}, "max_tokens": n,
        "lora": bool, "prompt_embeds": bool, "tp": n, "prefix_caching": bool (default off), "model": path (this engine's; default the spec's),
        "copy_files": [[src, dst]...] (copied before the engine starts: weights changed in place),
        "steps": [{"name": str, "prompts": [[ids]...], "salt": str|null, "pause": [ready, go],
                   "lora": [name, int id, path] | null, "embeds": path of a torch.save'd list,
                   "n": samples per prompt (default 1; n > 1 samples with top_k = 1)}]}]}

A step with "embeds" sends those tensors as ``prompt_embeds`` (one per prompt) instead of "prompts".
An engine's "block_size" (default 32; null: vLLM's default) and "enforce_eager" (default true) are
vLLM's; the GPU lane (tests/gpu/test_cuda_engine.py) runs with both left to vLLM. An engine with
"metrics": true runs with vLLM's stats on and records, after each step, every kvpool_connector_*
counter of the Prometheus registry (what `vllm serve`'s /metrics would show) under
``results["_metrics"][step name]`` as {"name{label=value,...}": value}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

STEP_MARKER = "engine_runner: step "


def run_engine(model: str, engine: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kwargs = {}
    if engine.get("connector", True):
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVPoolConnector",
            kv_connector_module_path="kvpool.connector.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=engine.get("extra", {}),
        )
    if engine.get("lora"):
        kwargs.update(enable_lora=True, max_lora_rank=8, max_loras=2)
    if engine.get("prompt_embeds"):
        kwargs["enable_prompt_embeds"] = True
    if engine.get("tp", 1) > 1:
        kwargs["tensor_parallel_size"] = engine["tp"]
    # "block_size": null takes vLLM's own, "enforce_eager": false keeps CUDA graphs on (tests/gpu)
    if engine.get("block_size", 32) is not None:
        kwargs["block_size"] = engine.get("block_size", 32)
    kwargs["enforce_eager"] = engine.get("enforce_eager", True)
    if engine.get("metrics"):
        _forget_kvpool_metrics()  # an earlier engine's in this process: registered again
        kwargs["disable_log_stats"] = False
    llm = LLM(
        model=model,
        # off unless asked: every reuse the tests see then comes from the pool
        enable_prefix_caching=bool(engine.get("prefix_caching", False)),
        max_model_len=2048,
        dtype="bfloat16",
        seed=0,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,
        **kwargs,
    )
    max_tokens = engine.get("max_tokens", 12)
    results: dict[str, list[dict]] = {}
    for step in engine["steps"]:
        # a marker the tests split the log at (enginetools.step_log): what the engines' processes
        # log during a step follows its marker
        print(f"{STEP_MARKER}{step['name']}", flush=True)
        if step.get("pause"):
            ready, go = step["pause"]
            open(ready, "w").close()
            deadline = time.time() + 120
            while not os.path.exists(go) and time.time() < deadline:
                time.sleep(0.05)
        salt = {"cache_salt": step["salt"]} if step.get("salt") else {}
        if step.get("embeds"):
            import torch

            prompts = [{"prompt_embeds": t, **salt} for t in torch.load(step["embeds"])]
        else:
            prompts = [{"prompt_token_ids": ids, **salt} for ids in step["prompts"]]
        lora = None
        if step.get("lora"):
            from vllm.lora.request import LoRARequest

            name, lora_id, path = step["lora"]
            lora = LoRARequest(name, lora_id, path)
        t0 = time.perf_counter()
        n = step.get("n", 1)
        # vLLM refuses n > 1 with greedy sampling; top_k = 1 samples the greedy token all the same
        greedy = {"temperature": 0} if n == 1 else {"temperature": 1.0, "top_k": 1, "seed": 0}
        sp = SamplingParams(max_tokens=max_tokens, n=n, **greedy)
        outs = llm.generate(prompts, sp, use_tqdm=False, lora_request=lora)
        elapsed = time.perf_counter() - t0
        results[step["name"]] = [
            {
                "prompt_len": len(o.prompt_token_ids or []),
                "cached": o.num_cached_tokens,
                "tokens": list(o.outputs[0].token_ids),
                "samples": [list(c.token_ids) for c in o.outputs],
                "seconds": elapsed,
            }
            for o in outs
        ]
        if engine.get("metrics"):
            results.setdefault("_metrics", {})[step["name"]] = _kvpool_metrics()
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    gc.collect()
    return results


def _kvpool_metrics() -> dict[str, float]:
    from prometheus_client import REGISTRY

    out = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name.startswith("kvpool_connector_") and sample.name.endswith("_total"):
                labels = ",".join(
                    f"{k}={v}" for k, v in sorted(sample.labels.items()) if k in ("reason", "detail", "kind")
                )
                out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def _forget_kvpool_metrics() -> None:
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(n.startswith("kvpool_connector_") for n in names):
            REGISTRY.unregister(collector)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    import shutil

    results = []
    for e in spec["engines"]:
        for src, dst in e.get("copy_files", []):
            shutil.copyfile(src, dst)
        results.append(run_engine(e.get("model", spec["model"]), e))
    out = {"engines": results}
    with open(spec["out"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
