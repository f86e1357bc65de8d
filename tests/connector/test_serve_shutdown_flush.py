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

import re
import signal
from pathlib import Path

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up

from . import servetools
from .enginetools import tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files

C = 64


def _serve(model: str, url: str, log: Path) -> servetools.Server:
    server = servetools.start(
        model, log, servetools.connector_config("kv_both", url, chunk_size=C), "--shutdown-timeout", "10"
    )
    servetools.wait_ready(server, timeout=300)
    return server


def _complete(server: servetools.Server, prompt: str) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    return servetools.post(server.base + "/v1/completions", body)


def test_ctrl_c_right_after_an_answer_leaves_its_chunks_in_the_pool(tmp_path):
    from kvpool.cli.devtools.tinymodel import corpus

    model = tiny_model(tmp_path / "tiny")
    prompt = corpus(600)
    with kvpool_up("--memory", "256MiB") as (_pool, url):
        server = _serve(model, url, tmp_path / "first.log")
        try:
            first = _complete(server, prompt)
        finally:
            rc = server.stop(signal.SIGINT)  # at once: the whole group, as Ctrl-C does
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

        server = _serve(model, url, tmp_path / "second.log")
        try:
            second = _complete(server, prompt)
        finally:
            server.stop(signal.SIGINT)
        text2 = (tmp_path / "second.log").read_text()
    assert f"Retrieved {full * C} of {n} tokens ({full} chunks)" in text2, text2[-4000:]
    assert (second["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") == full * C
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
