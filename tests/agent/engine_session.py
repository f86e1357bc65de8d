"""A real vLLM CPU engine that a test drives one command at a time (JSON lines on stdin).

engine_runner.py (tests/connector) runs a fixed list of steps; a fault test must act between
steps on what it observes (kill a process once a chunk has landed, restart it, wait until the
connector writes again). So this script builds one engine with the KV connector and then, for each
command, generates and writes the outputs to ``<out_dir>/<name>.json`` (renamed into place, so a
file that exists is complete). Started as a subprocess (vLLM spawns processes, so it needs its own
main); the engine settings are engine_runner.py's.

Spec (argv[1]): {"model": path, "out_dir": path, "extra": {kv_connector_extra_config}}.
Commands:
- {"op": "generate", "name": str, "prompts": [[ids]...], "max_tokens": n}: ``<name>.started``
  appears first (and the log marker ``engine_runner: step <name>``, so enginetools.step_log
  splits this log too), then ``<name>.json``: a list, per prompt, of {"prompt_len", "cached",
  "tokens"};
- {"op": "baseline", "steps": [{"name", "prompts", "max_tokens"}...]}: shuts the connector's
  engine down, builds the same engine without a connector, runs every step as it was sent (same
  batches) and writes ``baseline.json``: {name: results};
- {"op": "exit"}.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

STEP_MARKER = "engine_runner: step "  # the marker tests/connector/enginetools.step_log splits at


def build(model: str, extra: dict | None):
    """The engine of engine_runner.py: prefix caching off (every reuse comes from the pool),
    block size 32, eager, bfloat16, 64 MiB of KV cache; ``extra`` None: no connector."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = {}
    if extra is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVPoolConnector",
            kv_connector_module_path="kvpool.connector.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    return LLM(
        model=model,
        enable_prefix_caching=False,
        block_size=32,
        enforce_eager=True,
        max_model_len=2048,
        dtype="bfloat16",
        seed=0,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,
        **kwargs,
    )


def shut_down(llm) -> None:
    if hasattr(llm.llm_engine, "engine_core"):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def generate(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0),
        use_tqdm=False,
    )
    return [
        {
            "prompt_len": len(o.prompt_token_ids or []),
            "cached": o.num_cached_tokens,
            "tokens": list(o.outputs[0].token_ids),
            "finish_reason": o.outputs[0].finish_reason,
        }
        for o in outs
    ]


def write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out_dir"])
    llm = build(spec["model"], spec.get("extra", {}))
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["op"] == "generate":
            print(f"{STEP_MARKER}{cmd['name']}", flush=True)
            (out / f"{cmd['name']}.started").touch()
            write(out / f"{cmd['name']}.json", generate(llm, cmd["prompts"], cmd["max_tokens"]))
        elif cmd["op"] == "baseline":
            shut_down(llm)
            llm = build(spec["model"], None)
            print(f"{STEP_MARKER}baseline", flush=True)
            results = {s["name"]: generate(llm, s["prompts"], s["max_tokens"]) for s in cmd["steps"]}
            write(out / "baseline.json", results)
        elif cmd["op"] == "exit":
            break
        else:
            raise ValueError(f"unknown command {cmd!r}")
    shut_down(llm)


if __name__ == "__main__":
    main()
