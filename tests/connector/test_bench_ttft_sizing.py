"""`kvpool bench ttft` sizes the embedded pool from the model so the warm path measures loads, not
evictions: the KV bytes per token come from the model's config, and the pool holds every prompt."""

from __future__ import annotations

import json

from kvpool.cli.devtools.ttft import kv_bytes_per_token, pool_memory_for


def _config(tmp_path, **fields) -> str:
    base = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32}
    (tmp_path / "config.json").write_text(json.dumps({**base, **fields}))
    return str(tmp_path)


def test_kv_bytes_per_token_of_an_8b_llama(tmp_path):
    path = _config(tmp_path, num_key_value_heads=8, head_dim=128, dtype="bfloat16")
    assert kv_bytes_per_token(path) == 32 * 2 * 8 * 128 * 2  # 128 KiB


def test_kv_bytes_per_token_without_grouped_heads_in_float32(tmp_path):
    path = _config(tmp_path, dtype="float32")  # no num_key_value_heads, no head_dim: MHA, 4096/32
    assert kv_bytes_per_token(path) == 32 * 2 * 32 * 128 * 4


def test_the_pool_holds_every_prompt_with_room_to_spare():
    per_token = 32 * 2 * 8 * 128 * 2
    memory = pool_memory_for([4096, 32768], per_token)
    assert memory >= (4096 + 32768) * per_token * 1.25 > 2 << 30  # 4.5 GiB of KV: above the floor
    assert pool_memory_for([512], 512) == 2 << 30  # a tiny model keeps the embedded default
