"""What a vLLM request puts into its chunk keys, on vLLM's own request objects (no engine).

Chunks are 64 tokens here; prompts are 6 full chunks (384 tokens) plus a tail.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.request import Request

from kvpool.cli.devtools.tinymodel import ensure_tiny_lora
from kvpool.connector.keys import ModelFingerprint, chunk_keys
from kvpool.connector.request_keys import AdapterDigests, key_inputs

C = 64
FP = ModelFingerprint(
    model="tiny", revision="", kv_dtype="bfloat16", kv_layout="LKTHD/cpu", num_layers=2,
    num_kv_heads=2, head_dim=32, chunk_size=C, attn_backend="CPU_ATTN", kv_quant="none",
)  # fmt: skip
IMAGE_TOKEN = 7
# text 0..149, 100 image placeholder tokens at 150..249 (chunks 2 and 3), text after
PROMPT = [10 + i % 900 for i in range(150)] + [IMAGE_TOKEN] * 100 + [20 + i % 900 for i in range(150)]


def _request(tokens=PROMPT, *, images=(), lora=None, embeds=None, salt=None, rid="r") -> Request:
    features = [
        MultiModalFeatureSpec(
            data=None, modality="image", identifier=ident, mm_position=PlaceholderRange(offset=off, length=n)
        )
        for ident, off, n in images
    ]
    return Request(
        request_id=rid,
        prompt_token_ids=None if embeds is not None else list(tokens),
        prompt_embeds=embeds,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        mm_features=features or None,
        lora_request=lora,
        cache_salt=salt,
    )


def _keys(request: Request, adapters: AdapterDigests | None = None) -> list[bytes]:
    inputs = key_inputs(request, C, adapters or AdapterDigests())
    assert inputs.refused is None, inputs.refused
    return chunk_keys(FP, inputs.tokens, salt=inputs.salt, adapter=inputs.adapter, extras=inputs.extras)


def test_plain_token_prompts_keep_the_plain_keys():
    assert _keys(_request()) == chunk_keys(FP, PROMPT)


def test_two_images_on_the_same_placeholders_differ_from_the_image_chunk_on():
    """Same token ids (the placeholders), different image hashes: chunks 0-1 (before the image)
    are shared, every chunk at or after the image differs — also chunk 4-5, through the parent."""
    a = _keys(_request(images=[("img-hash-a", 150, 100)]))
    b = _keys(_request(images=[("img-hash-b", 150, 100)]))
    text = chunk_keys(FP, PROMPT)
    assert len(a) == len(b) == 6
    assert a[:2] == b[:2] == text[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert all(x != y for x, y in zip(a[2:], text[2:], strict=True))
    # deterministic: the same image gives the same keys
    assert a == _keys(_request(images=[("img-hash-a", 150, 100)]))


def test_the_same_image_at_another_offset_changes_the_keys_of_its_chunk():
    a = _keys(_request(images=[("img", 150, 100)]))
    moved = _keys(_request(images=[("img", 140, 100)]))  # same placeholder tokens' chunk, other offset
    assert a[:2] == moved[:2] and a[2] != moved[2]


def test_an_image_without_an_identifier_is_refused():
    inputs = key_inputs(_request(images=[("", 150, 100)]), C, AdapterDigests())
    assert inputs.refused and "identifier" in inputs.refused


def test_lora_keys_carry_the_adapter_weights_not_only_its_name(tmp_path):
    one = ensure_tiny_lora(tmp_path / "one", seed=1)
    two = ensure_tiny_lora(tmp_path / "two", seed=2)
    adapters = AdapterDigests(recheck_s=0)  # stat the files at every request
    base = _keys(_request(), adapters)
    a1 = _keys(_request(lora=LoRARequest("a", 1, str(one))), adapters)
    a1_again = _keys(_request(lora=LoRARequest("a", 5, str(one))), adapters)  # another int id
    same_name_other_weights = _keys(_request(lora=LoRARequest("a", 1, str(two))), adapters)
    other_name_same_weights = _keys(_request(lora=LoRARequest("b", 1, str(one))), adapters)
    assert a1 == a1_again
    assert len({base[0], a1[0], same_name_other_weights[0], other_name_same_weights[0]}) == 4
    assert len(adapters.hashed) == 2  # each adapter's files hashed once, then cached

    # new weights written in place under the same name and path: new keys
    (one / "adapter_model.safetensors").write_bytes((two / "adapter_model.safetensors").read_bytes())
    assert _keys(_request(lora=LoRARequest("a", 1, str(one))), adapters)[0] != a1[0]


def test_a_known_adapter_is_not_read_again_per_request(tmp_path):
    """Once hashed, an adapter costs a dict lookup: within the recheck period its files are not
    even stat'ed (here: gone, and still answered from the cache); after it, they are."""
    one = ensure_tiny_lora(tmp_path / "one", seed=1)
    adapters = AdapterDigests(recheck_s=3600)
    first = _keys(_request(lora=LoRARequest("a", 1, str(one))), adapters)
    for f in one.iterdir():
        f.unlink()
    assert _keys(_request(lora=LoRARequest("a", 1, str(one))), adapters) == first
    assert len(adapters.hashed) == 1
    recheck = AdapterDigests(recheck_s=0)
    assert key_inputs(_request(lora=LoRARequest("a", 1, str(one))), C, recheck).refused


def test_a_lora_whose_weights_cannot_be_read_is_refused(tmp_path):
    inputs = key_inputs(_request(lora=LoRARequest("x", 1, str(tmp_path / "absent"))), C, AdapterDigests())
    assert inputs.refused and "LoRA" in inputs.refused


def test_prompt_embeddings_are_keyed_by_their_values():
    torch.manual_seed(0)
    e = torch.randn(len(PROMPT), 128, dtype=torch.bfloat16)
    tokens = _keys(_request())
    emb = _keys(_request(embeds=e))
    assert len(emb) == 6 and not set(emb) & set(tokens)
    assert emb == _keys(_request(embeds=e.clone()))
    f = e.clone()
    f[200] += 1  # one position in chunk 3
    changed = _keys(_request(embeds=f))
    assert changed[:3] == emb[:3] and all(x != y for x, y in zip(changed[3:], emb[3:], strict=True))


def test_mixed_token_and_embedding_prompts_key_the_mask_too():
    """vLLM's mixed prompts (chat with embeddings): positions marked as embeddings hash as token 0
    plus the embeddings, so another mask over the same ids and embeddings gives other keys."""
    torch.manual_seed(1)
    e = torch.randn(len(PROMPT), 128, dtype=torch.bfloat16)

    def mixed(embedded: range) -> list[bytes]:
        mask = [i not in embedded for i in range(len(PROMPT))]
        r = Request(
            "m", list(PROMPT), SamplingParams(max_tokens=1), None, prompt_embeds=e, prompt_is_token_ids=mask
        )
        inputs = key_inputs(r, C, AdapterDigests())
        assert inputs.refused is None and inputs.tokens[100] == (0 if 100 in embedded else PROMPT[100])
        return chunk_keys(FP, inputs.tokens, extras=inputs.extras)

    a, b = mixed(range(90, 110)), mixed(range(150, 170))
    assert a[0] == b[0]  # chunk 0: same tokens, mask and embeddings
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))
    assert a == mixed(range(90, 110))
    assert set(a).isdisjoint(_keys(_request()))


def test_cache_salt_and_tail_rules_still_hold():
    assert _keys(_request(salt="t1"))[0] != _keys(_request())[0]
    assert len(_keys(_request(tokens=PROMPT[:63]))) == 0
