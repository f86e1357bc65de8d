"""Chunk keys: stable across processes, sensitive to every input, none for partial tails."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from kvpool.connector.keys import KEY_SIZE, ModelFingerprint, chunk_keys

FP = ModelFingerprint(
    model="tiny-llama", revision="abc", kv_dtype="bfloat16", kv_layout="LKTHD/cpu", num_layers=2,
    num_kv_heads=2, head_dim=32, chunk_size=16, tp_rank=0, tp_size=2, pp_rank=0, pp_size=1,
)  # fmt: skip
TOKENS = list(range(100, 164))  # 4 full chunks of 16

_SCRIPT = """
import json
from kvpool.connector.keys import ModelFingerprint, chunk_keys
fp = ModelFingerprint(**json.loads('''{fp}'''))
print(json.dumps([k.hex() for k in chunk_keys(fp, {tokens}, salt={salt!r})]))
"""


def test_keys_are_identical_across_processes_with_different_hash_seeds():
    script = _SCRIPT.format(fp=json.dumps(dataclasses.asdict(FP)), tokens=TOKENS, salt="tenant-a")
    results = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        results.append(json.loads(out.stdout))
    assert results[0] == results[1] == results[2]
    assert results[0] == [k.hex() for k in chunk_keys(FP, TOKENS, salt="tenant-a")]


def test_full_chunks_only_and_key_size():
    keys = chunk_keys(FP, [*TOKENS, 1, 2, 3])
    assert len(keys) == 4
    assert all(len(k) == KEY_SIZE for k in keys)
    assert chunk_keys(FP, TOKENS[:15]) == []
    assert chunk_keys(FP, TOKENS, max_chunks=2) == keys[:2]


def test_tail_does_not_change_full_chunk_keys():
    assert chunk_keys(FP, TOKENS) == chunk_keys(FP, TOKENS + [7] * 15)


@pytest.mark.parametrize(
    "field,value",
    [
        ("model", "other-model"),
        ("revision", "def"),
        ("kv_dtype", "float16"),
        ("kv_layout", "LKTHD/flash_attn"),
        ("num_layers", 3),
        ("num_kv_heads", 1),
        ("head_dim", 64),
        ("tp_rank", 1),
        ("tp_size", 4),
        ("pp_rank", 0),  # placeholder replaced below (pp_size 1 allows only rank 0)
        ("pp_size", 2),
        ("attn_backend", "FLASHINFER"),
        ("kv_quant", "fp8 scales digest"),
        ("kv_dtype", "fp8_e4m3"),
        ("model_dtype", "float16"),
        ("config_digest", "rope-scaled"),
        ("weights", "blake3:fine-tuned"),
        ("vllm_version", "0.33.0"),
        ("torch_version", "2.10.0"),
        ("cuda_version", "12.9"),
        ("device_capability", "cuda:8.0"),
        ("attn_variant", "fa2"),
    ],
)
def test_every_fingerprint_field_changes_every_key(field, value):
    if field == "pp_rank":
        other = dataclasses.replace(FP, pp_size=2, pp_rank=1)
        base = dataclasses.replace(FP, pp_size=2, pp_rank=0)
    else:
        other, base = dataclasses.replace(FP, **{field: value}), FP
    a, b = chunk_keys(base, TOKENS), chunk_keys(other, TOKENS)
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_chunk_size_changes_keys():
    other = dataclasses.replace(FP, chunk_size=32)
    assert chunk_keys(other, TOKENS)[0] != chunk_keys(FP, TOKENS)[1]
    assert set(chunk_keys(other, TOKENS)).isdisjoint(chunk_keys(FP, TOKENS))


def test_salt_changes_keys_and_none_equals_empty():
    plain = chunk_keys(FP, TOKENS)
    assert chunk_keys(FP, TOKENS, salt=None) == chunk_keys(FP, TOKENS, salt="") == plain
    a, b = chunk_keys(FP, TOKENS, salt="a"), chunk_keys(FP, TOKENS, salt="b")
    assert set(a).isdisjoint(b) and set(a).isdisjoint(plain)


def test_parent_chains_prefix_into_later_keys():
    changed = list(TOKENS)
    changed[3] += 1  # only the first chunk's tokens differ
    a, b = chunk_keys(FP, TOKENS), chunk_keys(FP, changed)
    assert all(x != y for x, y in zip(a, b, strict=True))
    later = list(TOKENS)
    later[40] += 1  # third chunk differs: first two keys unchanged
    c = chunk_keys(FP, later)
    assert c[:2] == a[:2] and c[2] != a[2] and c[3] != a[3]


def test_token_ids_and_format_version_matter(monkeypatch):
    assert chunk_keys(FP, TOKENS)[0] != chunk_keys(FP, [t + 1 for t in TOKENS])[0]
    import kvpool.connector.keys as keys_mod

    before = chunk_keys(FP, TOKENS)
    monkeypatch.setattr(keys_mod, "KEY_FORMAT_VERSION", keys_mod.KEY_FORMAT_VERSION + 1)
    assert set(chunk_keys(FP, TOKENS)).isdisjoint(before)


def test_adapter_and_per_chunk_extras_change_exactly_the_keys_they_should():
    from kvpool.connector.keys import Placeholder, adapter_identity, encode_extras

    plain = chunk_keys(FP, TOKENS)
    assert chunk_keys(FP, TOKENS, extras=[b""] * 4) == plain  # no extras = empty extras
    lora = chunk_keys(FP, TOKENS, adapter=adapter_identity("a", b"w" * 32))
    assert set(lora).isdisjoint(plain)
    assert chunk_keys(FP, TOKENS, adapter=adapter_identity("a", b"v" * 32))[0] != lora[0]
    # an input on tokens 20..27 (chunk 1): chunk 0 unchanged, chunks 1.. differ
    image = encode_extras(4, 16, [Placeholder("img", 20, 8)])
    keys = chunk_keys(FP, TOKENS, extras=image)
    assert keys[0] == plain[0] and all(a != b for a, b in zip(keys[1:], plain[1:], strict=True))
    assert image[2] == image[3] == b""  # later chunks depend on it through the parent only
    with pytest.raises(ValueError, match="extras"):
        chunk_keys(FP, TOKENS, extras=[b""] * 3)


def test_rejects_out_of_range_token_ids():
    with pytest.raises(ValueError):
        chunk_keys(FP, [-1] * 16)
