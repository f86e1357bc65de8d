"""Disaggregated prefill peer to peer (issue 24): a prefill server (kv_producer) and a decode server
(kv_consumer), each with its own `kvpool agent`, a lookup service and no cache nodes. The decode
engine's agent finds the prompt's chunks at the prefill engine's agent through the lookup service
and fetches them; the decode answer equals a cache-off engine's, token for token.

The router (tests/connector/pdproxy.py) sends the decode request right after the prefill answer,
while the producer's chunks may still be in flight (written into its agent's arena one step later,
then published to the lookup service): the decode engine waits for the announced chunks.
"""

from __future__ import annotations

import pytest

from kvpool.connector.keys import chunk_keys

from ..connector import pdproxy
from ..connector.enginetools import fingerprints, ids, run, tiny_model
from ..connector.servetools import connector_config, servers
from .conftest import agent_stats, holders

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files

C = 32
TOKENS = 32
PROMPTS = {"Q0": ids(345, 260), "Q1": ids(377, 261)}


def test_prefill_and_decode_servers_share_kv_through_their_agents(cluster, lookup, tmp_path):
    model = tiny_model(tmp_path / "tiny")
    steps = [{"name": name, "prompts": [p]} for name, p in PROMPTS.items()]
    (off,), _ = run({"model": model, "engines": [{"connector": False, "max_tokens": TOKENS, "steps": steps}]},
                    tmp_path, "off")  # fmt: skip
    # peers only, NIXL off (its progress thread would take a core from the engines on 2 cores)
    a = cluster.agent("prefill", "--nixl", "off", lookup=lookup)
    b = cluster.agent("decode", "--nixl", "off", lookup=lookup)
    specs = {
        "prefill": connector_config("kv_producer", a.url, chunk_size=C, timeout_ms=5000),
        "decode": connector_config(
            "kv_consumer", b.url, chunk_size=C, timeout_ms=5000, announced_wait_ms=10000
        ),
    }
    with servers(model, tmp_path / "logs", specs) as s:
        answers = {
            name: pdproxy.prefill_then_decode(s["prefill"], s["decode"], p, TOKENS)
            for name, p in PROMPTS.items()
        }
        decode_log = s["decode"].text()
    fp = fingerprints(decode_log)[(0, 0)]
    for name, prompt in PROMPTS.items():
        first, second = answers[name]
        assert first["kv_transfer_params"]["kvpool"]["chunks"] == len(prompt) // C, name
        assert pdproxy.tokens(second) == off[name][0]["tokens"], name
        assert pdproxy.cached_tokens(second) == len(prompt) // C * C, (
            name,
            second["usage"],
            cluster.logs()[-3000:],
        )
    chunks = sum(len(p) // C for p in PROMPTS.values())
    # only a peer could deliver: there are no cache nodes
    assert agent_stats(b)["agent"]["sources"]["fetched"] == {"peer": chunks, "pool": 0}
    keys = [k for p in PROMPTS.values() for k in chunk_keys(fp, p)]
    assert holders(lookup, keys).get("prefill") == chunks  # the producer's agent holds every chunk
