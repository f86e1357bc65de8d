"""A tiny Llama-shaped model and BPE tokenizer, generated locally (random weights, no download).

Used by the connector's engine tests, ``kvpool demo`` and ``kvpool bench ttft``: a real vLLM engine
runs it on a CPU in seconds. Outputs are gibberish, but deterministic and greedy, which is all the
cache's correctness proof needs (same tokens with the cache on and off). The head dim is 32, the
smallest the vLLM CPU attention backend accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_WORDS = [
    "the",
    "cache",
    "pool",
    "stores",
    "attention",
    "keys",
    "and",
    "values",
    "of",
    "text",
    "that",
    "was",
    "read",
    "once",
    "so",
    "that",
    "another",
    "engine",
    "can",
    "skip",
    "the",
    "prefill",
    "and",
    "answer",
    "sooner",
    "with",
    "fewer",
    "cycles",
    "a",
    "chunk",
    "holds",
    "tokens",
    "of",
    "a",
    "prompt",
    "and",
    "its",
    "key",
    "is",
    "a",
    "hash",
    "over",
    "the",
    "model",
    "the",
    "tenant",
    "the",
    "parent",
    "and",
    "the",
    "tokens",
    "kubernetes",
    "operator",
    "node",
    "agent",
    "lookup",
    "service",
    "disk",
    "memory",
    "redis",
    "valkey",
    "s3",
    "tier",
    "lease",
    "eviction",
    "budget",
    "document",
    "question",
    "answer",
    "system",
    "prompt",
    "chat",
    "history",
    "tool",
    "call",
    "retrieval",
    "augmented",
    "generation",
]

CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 8192,
}
_VERSION = "1"


def default_dir() -> Path:
    base = os.environ.get("KVPOOL_TINY_MODEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvpool", "tiny-llama"
    )
    return Path(base)


def corpus(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-text from the model's own vocabulary (for prompts and training)."""
    import random

    rnd = random.Random(seed)
    return " ".join(rnd.choice(_WORDS) for _ in range(n_words))


def _tokenizer(extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on ``corpus`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([corpus(2000, seed=i) for i in range(20)], trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def ensure_tiny_model(path: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Create the model once under ``path`` (default ``~/.cache/kvpool/tiny-llama``); reuse it after.
    Another ``seed`` gives other weights (same shapes): asked for at a path that holds a model of
    another seed, the weights there are overwritten in place."""
    out = Path(path) if path else default_dir()
    marker = out / "kvpool-tiny.json"
    if marker.exists():
        made = json.loads(marker.read_text())
        if made.get("version") == _VERSION and made.get("seed", 0) == seed:
            return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    _tokenizer().save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **CONFIG,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    marker.write_text(json.dumps({"version": _VERSION, "seed": seed, **CONFIG}))
    return out


def ensure_tiny_lora(path: str | os.PathLike, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter (PEFT files) for the tiny model whose ``k_proj``/``v_proj`` deltas are
    non-zero, so the same text has other keys and values under it than under the base model."""
    out = Path(path)
    marker = out / "kvpool-tiny-lora.json"
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return out
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hidden, kv_out = CONFIG["hidden_size"], CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    tensors = {}
    for layer in range(CONFIG["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.05
            tensors[f"{name}.lora_B.weight"] = torch.randn(kv_out, rank, generator=gen) * 0.05
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["k_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": "kvpool-tiny-llama",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    marker.write_text(json.dumps({"seed": seed, "rank": rank}))
    return out


if __name__ == "__main__":
    print(ensure_tiny_model())
