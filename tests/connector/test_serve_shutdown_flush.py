"""`vllm serve` stopped by Ctrl-C right after answering: the request's chunks are in the pool.

A real OpenAI server (vLLM CPU engine, tiny generated model) with the connector on a real `kvpool
up` pool answers one completion whose prompt holds 9 full chunks; at once (no pause) its whole
process group gets SIGINT, as Ctrl-C delivers it. A fresh server on the same pool then gets the
full hit: its connector logs "Retrieved 576 of 609 tokens" and the API reports the tokens cached.

What vLLM 0.32 does on that SIGINT (found by experiment, see connector/shutdown.py): the worker's
handler raises SystemExit, its `finally` shuts the worker down (→ the connector's `shutdown()`),
the engine core stops stepping, and the API server SIGTERMs the engine core and then — after
`--shutdown-timeout` seconds, default 0 — SIGKILLs the engine core and its workers. With the
default that is about 5 ms after Ctrl-C, too soon for any flush: a save survives only if it was
written before. So this test gives the server `--shutdown-timeout 10`, the documented way to let
the connector's flush (``shutdown_flush_ms``) run; the chunks' write is issued one step after the
prefill and on this machine takes tens of ms beside the decode steps, so it is often still queued
or in flight when the signal lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import free_port, kvpool_up

from .enginetools import tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

C = 64


def _post(url: str, data: dict | None = None, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(data).encode() if data else None, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read().decode()
    return json.loads(body) if body.strip().startswith("{") else {}


def _serve(model: str, url: str, log, extra: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ktc = {
        "kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_size": C, "url": url, **extra},
    }
    cmd = [
        sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
        "--host", "127.0.0.1", "--enforce-eager", "--max-model-len", "2048", "--block-size", "32",
        "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(64 << 20), "--enable-prompt-tokens-details",
        "--shutdown-timeout", "10", "--kv-transfer-config", json.dumps(ktc),
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="1")
    # its own process group: os.killpg reaches the API server, the engine core and the worker
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            _post(base + "/health", timeout=2)
            return proc, base
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise AssertionError(f"server did not start; see {log.name}") from None
            time.sleep(1)


def _stop(proc: subprocess.Popen, sig: int) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)


def test_ctrl_c_right_after_an_answer_leaves_its_chunks_in_the_pool(tmp_path):
    from kvpool.cli.devtools.tinymodel import corpus

    model = tiny_model(tmp_path / "tiny")
    prompt = corpus(600)
    with kvpool_up("--memory", "256MiB") as (_pool, url):
        with open(tmp_path / "first.log", "w") as log:
            proc, base = _serve(model, url, log, {})
            try:
                first = _post(
                    base + "/v1/completions",
                    {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
                )
            finally:
                rc = _stop(proc, signal.SIGINT)  # at once: the whole group, as Ctrl-C does
        text = (tmp_path / "first.log").read_text()
        n = first["usage"]["prompt_tokens"]
        full = n // C
        assert full >= 5, n
        assert rc is not None
        # the connector said what it stored and dropped when the signal came
        flushed = re.findall(r"saves flushed \((SIGINT|engine shutdown)\).*dropped (\d+) tokens", text)
        assert flushed and all(d == "0" for _, d in flushed), text[-4000:]
        with Client(url) as c:
            assert c.stats()["tiers"]["memory"]["entries"] == full, text[-4000:]

        with open(tmp_path / "second.log", "w") as log:
            proc, base = _serve(model, url, log, {})
            try:
                second = _post(
                    base + "/v1/completions",
                    {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
                )
            finally:
                _stop(proc, signal.SIGINT)
        text2 = (tmp_path / "second.log").read_text()
    assert f"Retrieved {full * C} of {n} tokens ({full} chunks)" in text2, text2[-4000:]
    assert (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") == full * C
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
