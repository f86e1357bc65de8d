"""Disaggregated prefill through the pool (issue 24): prefill servers (kv_producer) compute a
prompt's KV, decode servers (kv_consumer) load it and generate, with no recompute and no race.

Real `vllm serve` processes (vLLM CPU engine, the tiny generated model), a real `kvpool up` pool,
and tests/connector/pdproxy.py as the router: max_tokens=1 on a prefill server, then the decode
server with the kv_transfer_params that came back. Every decode answer is compared token for
token with a cache-off engine (engine_runner.py, the same engine settings); the decode server's
hit must be the whole prompt but its last partial block (chunk size = block size = 32), so it
computed no prompt chunk itself.

The race is made certain rather than hoped for: a producer reaches the pool through faultproxy.py,
which holds each of its puts 1.5 s, so at its answer the pool holds none of the prompt's chunks
(checked). A decode request waits for them and loads them all, whether it carries the producer's
announcement or not (a kv_consumer expects every full chunk of a prompt); a producer killed right
after its answer, before its chunks are stored, leaves the decode server to wait out its bound
and compute, with the right answer. The negative control of the token comparison is
test_serve_metrics.py's (planted wrong KV changes a served answer) and test_engine.py's.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector.keys import chunk_keys

from . import pdproxy
from .enginetools import fault_proxy, fingerprints, ids, payload, plant, run, tiny_model
from .servetools import connector_config, servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files

C = 32  # = the block size: a hit can reach the prompt's last full block
TOKENS = 32
PROMPTS = {f"P{i}": ids(330 + 20 * i, 240 + i) for i in range(8)} | {"W": ids(330, 251)}
SLOW_PUT_S = 1.5
BOUND_MS = 6000  # the decode servers' announced_wait_ms: well past a held put on a loaded machine


def full(prompt: list[int]) -> int:
    return len(prompt) // C * C


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, list[int]]:
    """Each prompt's 32 greedy tokens from a cache-off engine."""
    tmp = tmp_path_factory.mktemp("reference")
    steps = [{"name": name, "prompts": [p]} for name, p in PROMPTS.items()]
    (off,), _ = run({"model": model, "engines": [{"connector": False, "max_tokens": TOKENS, "steps": steps}]},
                    tmp, "off")  # fmt: skip
    out = {name: off[name][0]["tokens"] for name in PROMPTS}
    assert all(len(t) == TOKENS for t in out.values())
    return out


def retrieved(log: str) -> list[tuple[int, int]]:
    """(tokens retrieved, prompt tokens) of every load the connector logged."""
    return [(int(a), int(b)) for a, b in re.findall(r"Retrieved (\d+) of (\d+) tokens", log)]


def test_two_prefill_and_two_decode_servers_through_a_node(model, reference, tmp_path):
    with kvpool_up("--memory", "256MiB") as (_pool, url):
        specs = {
            "prefill-1": connector_config("kv_producer", url, chunk_size=C),
            "prefill-2": connector_config("kv_producer", url, chunk_size=C),
            "decode-1": connector_config("kv_consumer", url, chunk_size=C, announced_wait_ms=3000),
            "decode-2": connector_config("kv_consumer", url, chunk_size=C, announced_wait_ms=3000),
        }
        with servers(model, tmp_path, specs) as s, Client(url, timeout=10) as pool:
            prefills, decodes = [s["prefill-1"], s["prefill-2"]], [s["decode-1"], s["decode-2"]]
            stored = 0
            for i, name in enumerate(["P0", "P1", "P2", "P3"]):  # every pairing once: 1P+1D, 2P+2D
                prompt = PROMPTS[name]
                first, second = pdproxy.prefill_then_decode(prefills[i % 2], decodes[i // 2], prompt, TOKENS)
                announced = first["kv_transfer_params"]["kvpool"]
                assert announced["chunks"] == len(prompt) // C, (name, announced)
                assert pdproxy.cached_tokens(first) == 0, name  # a producer never loads
                assert pdproxy.tokens(second) == reference[name], name
                assert pdproxy.cached_tokens(second) == full(prompt), (name, second["usage"])
                stored += len(prompt) // C
            # a consumer never stores: a prompt sent to it alone (it waits for the prompt's chunks
            # first, as for any request prefilled elsewhere: 3 s) is computed and left out of the pool
            alone = decodes[0].complete(PROMPTS["P4"], TOKENS)
            assert pdproxy.tokens(alone) == reference["P4"] and pdproxy.cached_tokens(alone) == 0
            # a producer never loads: a prompt whose chunks are all in the pool is computed again
            again = prefills[1].complete(PROMPTS["P0"], 1)
            assert pdproxy.cached_tokens(again) == 0
            time.sleep(1.0)  # saves are written in the background: give a wrong one time to land
            assert pool.stats()["tiers"]["memory"]["entries"] == stored
            # the negative control: P0's real KV, well-formed, planted under W's keys (a prompt no
            # engine computed) reaches a decode server the same way and changes its answer
            fp = fingerprints(decodes[0].text())[(0, 0)]
            for source, target in zip(
                chunk_keys(fp, PROMPTS["P0"]), chunk_keys(fp, PROMPTS["W"]), strict=True
            ):
                plant(pool, fp, target, payload(fp, source, pool.get(source)))
            planted = decodes[1].complete(PROMPTS["W"], TOKENS)
            assert pdproxy.cached_tokens(planted) == full(PROMPTS["W"])
            assert pdproxy.tokens(planted) != reference["W"]
        logs = {name: server.text() for name, server in s.items()}
    for name in ("prefill-1", "prefill-2"):  # one line per request, loading nothing (load is off)
        assert retrieved(logs[name]) and all(got == 0 for got, _ in retrieved(logs[name])), name
        assert "refused:load_off" in logs[name]
    loads = [load for name in ("decode-1", "decode-2") for load in retrieved(logs[name]) if load[0]]
    assert sorted(loads) == sorted((full(PROMPTS[n]), len(PROMPTS[n])) for n in ("P0", "P1", "P2", "P3", "W"))


def test_a_decode_request_waits_for_the_chunks_its_prefill_engine_is_storing(model, reference, tmp_path):
    """The producer's puts are held 1.5 s, so at its answer the pool holds none of the prompt's
    chunks (checked: the race is real). A decode request with the announcement waits and loads
    every chunk; so does one without it (a router that sends the client's own request: the
    consumer expects every full prompt chunk); after the producer is killed right after its
    answer, the decode request waits out its bound and computes — every answer right."""
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"slow_put_s": SLOW_PUT_S}))
    with kvpool_up("--memory", "256MiB") as (_pool, url), fault_proxy(url, faults, tmp_path) as slow_url:
        specs = {
            "prefill": connector_config("kv_producer", slow_url, chunk_size=C, timeout_ms=5000),
            "decode": connector_config("kv_consumer", url, chunk_size=C, announced_wait_ms=BOUND_MS),
        }
        with servers(model, tmp_path, specs) as s, Client(url, timeout=10) as pool:
            prefill, decode = s["prefill"], s["decode"]
            fp = fingerprints(decode.text())[(0, 0)]
            for name, forward in (("P5", True), ("P6", False)):
                prompt = PROMPTS[name]
                first = prefill.complete(prompt, 1, kv_transfer_params={"do_remote_decode": True})
                assert pool.prefix_hits(chunk_keys(fp, prompt)) == 0, "the held puts landed before the answer"
                params = {"kv_transfer_params": first["kv_transfer_params"]} if forward else {}
                second = decode.complete(prompt, TOKENS, **params)
                assert pdproxy.tokens(second) == reference[name], name
                assert pdproxy.cached_tokens(second) == full(prompt), (name, second["usage"])

            # the producer dies right after answering, before its chunks are stored (a put it had
            # sent is held by the proxy and then dropped, as a node drops a broken put stream)
            first = prefill.complete(PROMPTS["P7"], 1, kv_transfer_params={"do_remote_decode": True})
            prefill.stop(signal.SIGKILL)
            t0 = time.monotonic()
            third = decode.complete(PROMPTS["P7"], TOKENS, kv_transfer_params=first["kv_transfer_params"])
            waited = time.monotonic() - t0
            assert pdproxy.tokens(third) == reference["P7"]
            assert pdproxy.cached_tokens(third) == 0
            assert waited >= BOUND_MS / 1000 * 0.9  # it waited out its bound, then computed
            assert (
                pool.prefix_hits(chunk_keys(fp, PROMPTS["P7"])) == 0
            )  # the dead producer's chunks never landed
            decode_log = decode.text()
    assert (
        f"{len(PROMPTS['P7']) // C} expected, 0 found after" in decode_log
        and "computing the rest" in decode_log
    ), decode_log[-3000:]
