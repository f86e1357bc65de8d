"""LoRA adapters and prompt embeddings on the real vLLM CPU engine, with the connector on a pool.

Two engines (both with LoRA and prompt embeddings enabled) and one `kvpool up`: ``off`` has no
connector and gives the reference outputs; ``on`` runs the same requests through the pool. Every
request generates 32 tokens, compared token for token. Chunks are 64 tokens, blocks 32.

The adapters change k_proj and v_proj (cli/devtools/tinymodel.py): the same text has other KV under
each adapter, which is what the chunk keys must tell apart. The negative controls plant the KV a
connector that ignored the adapter (or the embeddings) would have loaded, and show that it changes
the answer — so the equality checks can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector.keys import adapter_identity, chunk_keys
from kvpool.connector.request_keys import AdapterDigests, key_inputs

from .enginetools import fingerprints, finish, ids, payload, plant, run, tiny_model, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # one fixture starts every engine

C = 64
TOKENS = 32
P = ids(330, 101)  # the document: 5 full chunks
Q = ids(330, 102)  # for the LoRA negative control
P3 = ids(200, 103)  # stored only as embeddings, then sent as token ids
Q2 = ids(200, 104)  # its token KV is planted under the keys of perturbed embeddings


def _embeddings(model: str, tokens: list[int]) -> torch.Tensor:
    from safetensors.torch import load_file

    table = load_file(str(Path(model) / "model.safetensors"))["model.embed_tokens.weight"]
    return table[torch.tensor(tokens)].clone()


def _embeds_keys(fp, embeds: torch.Tensor) -> list[bytes]:
    from vllm import SamplingParams
    from vllm.v1.request import Request

    request = Request("probe", None, SamplingParams(max_tokens=1), None, prompt_embeds=embeds)
    inputs = key_inputs(request, C, AdapterDigests())
    return chunk_keys(fp, inputs.tokens, extras=inputs.extras)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from kvpool.cli.devtools.tinymodel import ensure_tiny_lora

    tmp = tmp_path_factory.mktemp("features")
    model = tiny_model(tmp / "tiny-llama")
    lora1, lora2 = str(ensure_tiny_lora(tmp / "lora1", seed=1)), str(ensure_tiny_lora(tmp / "lora2", seed=2))
    l1, l2 = ["l1", 1, lora1], ["l2", 2, lora2]
    emb_p, emb_p3 = _embeddings(model, P), _embeddings(model, P3)
    emb_x = _embeddings(model, Q2) + 0.02 * torch.randn(
        len(Q2), 128, generator=torch.Generator().manual_seed(0)
    ).to(torch.bfloat16)
    files = {}
    for name, t in (("p", emb_p), ("p3", emb_p3), ("x", emb_x)):
        files[name] = str(tmp / f"embeds-{name}.pt")
        torch.save([t], files[name])
    engine = {"lora": True, "prompt_embeds": True, "max_tokens": TOKENS}
    out: dict = {}

    ref_steps = [
        {"name": "base", "prompts": [P]},
        {"name": "l1", "prompts": [P], "lora": l1},
        {"name": "l2", "prompts": [P], "lora": l2},
        {"name": "emb", "embeds": files["p"]},
        {"name": "emb3", "embeds": files["p3"]},
        {"name": "tok3", "prompts": [P3]},
        {"name": "Q_l1", "prompts": [Q], "lora": l1},
        {"name": "embX", "embeds": files["x"]},
        {"name": "Q2", "prompts": [Q2]},
    ]
    out["off"], _ = run(
        {"model": model, "engines": [{**engine, "connector": False, "steps": ref_steps}]}, tmp, "off"
    )

    with kvpool_up("--memory", "256MiB") as (_pool, url):
        ready, go = str(tmp / "on.ready"), str(tmp / "on.go")
        steps = [
            {"name": "base", "prompts": [P]},
            {"name": "l1a", "prompts": [P], "lora": l1},
            {"name": "l1b", "prompts": [P], "lora": l1},
            {"name": "l2", "prompts": [P], "lora": l2},
            {"name": "emb1", "embeds": files["p"]},
            {"name": "emb2", "embeds": files["p"]},
            {"name": "base2", "prompts": [P]},
            {"name": "emb3", "embeds": files["p3"]},
            {"name": "tok3", "prompts": [P3]},
            {"name": "Qbase", "prompts": [Q]},
            {"name": "Q2", "prompts": [Q2]},
            {"name": "Q_l1", "prompts": [Q], "lora": l1, "pause": [ready, go]},
            {"name": "embX", "embeds": files["x"]},
        ]
        extra = {"chunk_size": C, "url": url, "timeout_ms": 2000}
        spec = {"model": model, "engines": [{**engine, "extra": extra, "steps": steps}]}
        proc = run(spec, tmp, "on", wait=False)
        wait_for(ready, proc, tmp, "on")
        fp = fingerprints((tmp / "on.log").read_text())[(0, 0)]
        with Client(url, timeout=5) as c:
            out["pool_has_P"] = c.prefix_hits(chunk_keys(fp, P))
            # negative control (LoRA): the base model's KV of Q under the adapter request's keys —
            # what a connector keyed by the tokens alone would load (the bug this file guards)
            adapter = adapter_identity("l1", AdapterDigests().digest(lora1))
            for base_key, lora_key in zip(chunk_keys(fp, Q), chunk_keys(fp, Q, adapter=adapter), strict=True):
                plant(c, fp, lora_key, payload(fp, base_key, c.get(base_key)))
            # negative control (embeddings): Q2's token KV under the keys of perturbed embeddings
            for tok_key, emb_key in zip(chunk_keys(fp, Q2), _embeds_keys(fp, emb_x), strict=True):
                plant(c, fp, emb_key, payload(fp, tok_key, c.get(tok_key)))
        Path(go).touch()
        out["on"], out["on_log"] = finish(proc, spec, tmp, "on")
    return out


def _off(runs, name: str) -> list[int]:
    return runs["off"][0][name][0]["tokens"]


def _on(runs, name: str) -> dict:
    return runs["on"][0][name][0]


def test_the_adapters_change_the_answer(runs):
    assert len({tuple(_off(runs, n)) for n in ("base", "l1", "l2")}) == 3


def test_lora_after_the_base_model_computes_and_matches_cache_off(runs):
    assert runs["pool_has_P"] == 5  # the base model's chunks were there to be (wrongly) taken
    a = _on(runs, "l1a")
    assert a["cached"] == 0
    assert a["tokens"] == _off(runs, "l1")


def test_a_second_request_with_the_adapter_hits_the_first_ones_chunks(runs):
    b = _on(runs, "l1b")
    assert b["cached"] == 320
    assert b["tokens"] == _off(runs, "l1")


def test_two_adapters_never_share_chunks(runs):
    two = _on(runs, "l2")
    assert two["cached"] == 0  # the base's and adapter 1's chunks of the same text are in the pool
    assert two["tokens"] == _off(runs, "l2")


def test_prompt_embeddings_and_token_ids_never_share_chunks(runs):
    e1, e2 = _on(runs, "emb1"), _on(runs, "emb2")
    assert e1["cached"] == 0  # the token-id chunks of the same prompt are in the pool
    assert e2["cached"] == 320  # embeddings reuse their own chunks
    assert e1["tokens"] == e2["tokens"] == _off(runs, "emb")
    assert _on(runs, "base2")["cached"] == 320
    assert _on(runs, "base2")["tokens"] == _off(runs, "base")
    assert _on(runs, "emb3")["tokens"] == _off(runs, "emb3")
    tok3 = _on(runs, "tok3")
    assert tok3["cached"] == 0  # stored only as embeddings
    assert tok3["tokens"] == _off(runs, "tok3")


def test_negative_control_base_kv_under_adapter_keys_changes_the_answer(runs):
    wrong = _on(runs, "Q_l1")
    assert wrong["cached"] == 320
    assert wrong["tokens"] != _off(runs, "Q_l1")


def test_negative_control_token_kv_under_embedding_keys_changes_the_answer(runs):
    assert _off(runs, "embX") != _off(runs, "Q2")  # the perturbed embeddings read differently
    wrong = _on(runs, "embX")
    assert wrong["cached"] == 192
    assert wrong["tokens"] != _off(runs, "embX")
