"""Helpers shared by the engine tests: run engine_runner.py, read what the connector logged, and
write chunks into a pool the way a (wrong) engine would."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import free_port
from kvpool.connector import chunkfmt
from kvpool.connector.keys import ModelFingerprint

RUNNER = str(Path(__file__).with_name("engine_runner.py"))
PROXY = str(Path(__file__).with_name("faultproxy.py"))
_FP_LINE = re.compile(r"chunk keys of tp(\d+)/pp(\d+) use fingerprint [0-9a-f]+ (\{.*\})")


def ids(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 1000) for _ in range(n)]


def tiny_model(default_dir: Path) -> str:
    """The tiny generated model the engine tests run: in KVPOOL_TINY_MODEL_DIR when set (shared
    between runs), else made in ``default_dir``."""
    from kvpool.cli.devtools.tinymodel import ensure_tiny_model

    return str(ensure_tiny_model(os.environ.get("KVPOOL_TINY_MODEL_DIR") or default_dir))


def run(spec: dict, tmp: Path, name: str, wait: bool = True, env: dict | None = None):
    """Run the engines of ``spec``; returns (engine results, log text), or the process."""
    spec_path = tmp / f"{name}.json"
    spec["out"] = str(tmp / f"{name}.out.json")
    spec_path.write_text(json.dumps(spec))
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (handed to the child process)
    proc = subprocess.Popen(
        [sys.executable, "-P", RUNNER, str(spec_path)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    if not wait:
        return proc
    return finish(proc, spec, tmp, name)


def finish(proc, spec: dict, tmp: Path, name: str, timeout: float = 600):
    rc = proc.wait(timeout=timeout)
    text = (tmp / f"{name}.log").read_text()
    assert rc == 0, f"engine run {name} failed:\n{text[-4000:]}"
    return json.loads(Path(spec["out"]).read_text())["engines"], text


def wait_for(path: str, proc, tmp: Path, name: str, timeout: float = 600) -> None:
    """Until the engine run reaches a paused step (its ready file appears)."""
    deadline = time.time() + timeout
    while not Path(path).exists():
        assert proc.poll() is None and time.time() < deadline, (tmp / f"{name}.log").read_text()[-4000:]
        time.sleep(0.1)


def step_log(log: str, name: str) -> str:
    """What a run logged during its step ``name`` (engine_runner.py marks where each step starts):
    a check on one step cannot pass on another step's lines. The first step of that name."""
    marker = f"engine_runner: step {name}\n"
    assert marker in log, f"no step {name} in the log"
    return log.split(marker, 1)[1].split("engine_runner: step ", 1)[0]


_LOAD_LINE = re.compile(
    r"Retrieved (\d+) of (\d+) tokens \((\d+) chunks\) from \S+ in ([\d.]+) ms(?:; (\d+) tokens failed)?"
)
DEADLINE_MS = 500
"""The connector deadline (``timeout_ms``) of the engine tests that slow a Get through faultproxy."""


def loads(log: str) -> list[tuple[int, int, float, int]]:
    """Every load the connector logged (one line per load, never rate-limited, unlike its warning
    of a failed call): (tokens loaded, prompt tokens, milliseconds, tokens that failed)."""
    return [
        (int(ok), int(total), float(ms), int(failed or 0))
        for ok, total, _c, ms, failed in _LOAD_LINE.findall(log)
    ]


def cut_at_the_deadline(ms: float, slow_s: float) -> bool:
    """Whether a failed load lasted as long as a timeout: the ``DEADLINE_MS`` it waited (minus a
    little for clock granularity), and less than the ``slow_s`` the late answer took — a refused
    or missing chunk fails in milliseconds, a load that waited for the answer takes ``slow_s``."""
    return DEADLINE_MS * 0.9 <= ms < slow_s * 1000


def fingerprints(log: str) -> dict[tuple[int, int], ModelFingerprint]:
    """The fingerprint of each (tp, pp) rank, as the engine's scheduler logged it."""
    found = {
        (int(tp), int(pp)): ModelFingerprint(**json.loads(body)) for tp, pp, body in _FP_LINE.findall(log)
    }
    assert found, "the connector logged no fingerprint (cache off?)"
    return found


def all_fingerprints(log: str) -> list[ModelFingerprint]:
    """Every fingerprint the log holds, in order (one per rank of each engine a run started)."""
    return [ModelFingerprint(**json.loads(body)) for _tp, _pp, body in _FP_LINE.findall(log)]


def chunk_spec(fp: ModelFingerprint, key: bytes) -> chunkfmt.ChunkSpec:
    return chunkfmt.ChunkSpec(
        key,
        fp.digest,
        "bfloat16",
        (fp.num_layers, 2, fp.chunk_size, fp.num_kv_heads, fp.head_dim),
        fp.chunk_size,
    )


def payload(fp: ModelFingerprint, key: bytes, value) -> bytes:
    """The KV bytes of a stored chunk (verified)."""
    return bytes(chunkfmt.decode(value, chunk_spec(fp, key)))


def plant(client: Client, fp: ModelFingerprint, key: bytes, kv: bytes) -> None:
    """Store ``kv`` under ``key`` as a well-formed chunk: right key, header and checksum."""
    client.put(key, chunkfmt.encode(chunk_spec(fp, key), kv))


@contextlib.contextmanager
def fault_proxy(upstream: str, faults: Path, tmp: Path) -> Iterator[str]:
    """faultproxy.py in front of ``upstream``; yields its URL."""
    port = free_port()
    log = open(tmp / "faultproxy.log", "w")  # noqa: SIM115 (handed to the child process)
    proc = subprocess.Popen(
        [sys.executable, "-P", PROXY, upstream, str(port), str(faults)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"grpc://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while "ready" not in (tmp / "faultproxy.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp / "faultproxy.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=10)
