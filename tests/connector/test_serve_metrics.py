"""`vllm serve` (the OpenAI server) with the connector: its /metrics shows kvpool_connector_*.

The connector runs in vLLM's engine processes while /metrics is served by the API server, so this
proves the stats travel vLLM's connector-stats path and land in the server's registry.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector.keys import chunk_keys

from . import servetools
from .enginetools import fingerprints, ids, payload, plant, run, tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
]  # two engine starts (a cache-off one, then the server)
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files
TOKENS = 16  # generated per request


def _get(url: str, data: dict | None = None, timeout: float = 60) -> str:
    req = urllib.request.Request(
        url, data=json.dumps(data).encode() if data else None, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_vllm_serve_metrics_show_connector_counters(tmp_path):
    """Also: the served answers equal a cache-off engine's (engine_runner.py, the same settings),
    and a negative control shows that comparison can fail (another prompt's real KV, planted under
    a third prompt's keys in the node the server uses, changes that prompt's answer)."""
    model = tiny_model(tmp_path / "tiny")
    prompt, wrong = ids(300, 71), ids(300, 72)
    steps = [{"name": "P", "prompts": [prompt]}, {"name": "W", "prompts": [wrong]}]
    (off,), _ = run({"model": model, "engines": [{"connector": False, "max_tokens": TOKENS, "steps": steps}]},
                    tmp_path, "off")  # fmt: skip
    with kvpool_up("--memory", "128MiB") as (_pool, url):
        # `vllm serve` itself, with engine_runner.py's settings (the reference)
        server = servetools.start(
            model, tmp_path / "serve.log", servetools.connector_config("kv_both", url, chunk_size=64)
        )
        log, base = server.log, server.base

        def complete(ids: list[int]) -> list[int]:
            return server.complete(ids, TOKENS)["choices"][0]["token_ids"]

        try:
            servetools.wait_ready(server, timeout=240)
            first = complete(prompt)
            fp = fingerprints(log.read_text())[(0, 0)]
            keys = chunk_keys(fp, prompt)
            with Client(url, timeout=5) as c:
                deadline = time.time() + 30  # saves are written in the background
                while c.prefix_hits(keys) < len(keys):
                    assert time.time() < deadline, "the server never stored the prompt's chunks"
                    time.sleep(0.2)
                second = complete(prompt)  # loads all 4 full chunks
                assert (
                    len(first) == TOKENS and first == second == off["P"][0]["tokens"]
                )  # the cache-off answer
                for source, target in zip(keys, chunk_keys(fp, wrong), strict=True):
                    plant(c, fp, target, payload(fp, source, c.get(source)))  # well-formed, wrong KV
            assert complete(wrong) != off["W"][0]["tokens"]  # the negative control
            deadline = time.time() + 30
            while True:  # stats reach the API server with the engine's periodic stats
                metrics = _get(base + "/metrics")
                if (
                    "kvpool_connector_hit_tokens_total{" in metrics
                    and _metric(metrics, "kvpool_connector_hit_tokens_total") >= 2 * 256
                ):
                    break
                assert time.time() < deadline, metrics[-3000:]
                time.sleep(1)
            assert _metric(metrics, "kvpool_connector_requests_total") == 3
            assert (
                _metric(metrics, "kvpool_connector_hit_tokens_total") == 2 * 256
            )  # the second and the control
            assert _metric(metrics, "kvpool_connector_stored_tokens_total") >= 256
            assert _metric(metrics, "kvpool_connector_load_seconds_count") >= 1
            assert "Retrieved 256 of 300 tokens" in log.read_text()
        finally:
            server.stop()
