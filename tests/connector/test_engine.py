"""The connector on a real vLLM CPU engine (tiny random Llama generated here; nothing downloads).

All engine runs happen once per module (engine start is the slow part) in subprocesses running
engine_runner.py; the tests assert on what they recorded. Prefix caching is off in every engine,
so a cached token can only have come from the pool. Chunks are 64 tokens, blocks 32.

Engines:  base   — no connector: the reference outputs for every prompt.
          emb    — embedded pool with a disk dir; then a second engine with another model id on
                   the same dir (fingerprint → 0 hits); then a restart on the same dir (disk hits).
          A, B   — two engine processes and one `kvpool up` between them: B retrieves what A
                   stored; one chunk corrupted before B; the pool killed while B is paused.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvpool.cli.local_servers import free_port
from kvpool.connector import chunkfmt
from kvpool.connector.keys import ModelFingerprint, chunk_keys

pytestmark = pytest.mark.slow

C = 64
RUNNER = str(Path(__file__).with_name("engine_runner.py"))


def _ids(n: int, seed: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(3, 1000) for _ in range(n)]


P_A = _ids(330, 1)  # 5 full chunks + 10-token tail → 320 loadable
P_C = P_A[:150] + _ids(180, 2)  # shares chunks 0-1 with P_A (chunk 2 differs at token 150)
P_X = _ids(256, 3)  # exactly 4 chunks → 224 loadable (one token must be computed)
P_S = _ids(40, 4)  # shorter than a chunk
P_B = [_ids(200, 10 + i) for i in range(3)]  # a batch: 3 full chunks each
P_D = _ids(140, 20)  # A stores; its chunk 1 is corrupted in the pool before B reads it
P_N = _ids(200, 21)  # never computed: the test writes well-formed chunks of wrong KV for it
P_E = _ids(200, 22)  # after the pool is killed
ALL = {"A": P_A, "C": P_C, "X": P_X, "S": P_S, "D": P_D, "N": P_N, "E": P_E}
ALL.update({f"B{i}": p for i, p in enumerate(P_B)})


def _run(spec: dict, tmp: Path, name: str, wait: bool = True):
    spec_path = tmp / f"{name}.json"
    spec["out"] = str(tmp / f"{name}.out.json")
    spec_path.write_text(json.dumps(spec))
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (handed to the child process)
    proc = subprocess.Popen(
        [sys.executable, "-P", RUNNER, str(spec_path)], stdout=log, stderr=subprocess.STDOUT
    )
    if not wait:
        return proc
    return _finish(proc, spec, tmp, name)


def _finish(proc, spec, tmp, name):
    rc = proc.wait(timeout=300)
    text = (tmp / f"{name}.log").read_text()
    assert rc == 0, f"engine run {name} failed:\n{text[-4000:]}"
    return json.loads(Path(spec["out"]).read_text())["engines"], text


def _fingerprint(model: str) -> ModelFingerprint:
    """What the connector computes for the tiny model on CPU (checked: the pool has these keys)."""
    return ModelFingerprint(
        model=model, revision="", kv_dtype="bfloat16", kv_layout="LKTHD/cpu", num_layers=2,
        num_kv_heads=2, head_dim=32, chunk_size=C,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from kvpool.cachenode import Client
    from kvpool.connector.tinymodel import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("engines")
    model = str(ensure_tiny_model(os.environ.get("KVPOOL_TINY_MODEL_DIR") or tmp / "tiny-llama"))
    out: dict = {"model": model}

    base_steps = [{"name": k, "prompts": [v]} for k, v in ALL.items()]
    out["base"], _ = _run(
        {"model": model, "engines": [{"connector": False, "steps": base_steps}]}, tmp, "base"
    )

    disk = str(tmp / "emb-disk")
    emb_extra = {"chunk_size": C, "disk_dir": disk, "disk_size": "256MiB", "memory": "128MiB"}
    emb = [
        {
            "extra": emb_extra,
            "steps": [
                {"name": "A1", "prompts": [P_A]},
                {"name": "A2", "prompts": [P_A]},
                {"name": "C", "prompts": [P_C]},
                {"name": "X1", "prompts": [P_X]},
                {"name": "X2", "prompts": [P_X]},
                {"name": "S1", "prompts": [P_S]},
                {"name": "S2", "prompts": [P_S]},
                {"name": "B1", "prompts": P_B},
                {"name": "B2", "prompts": P_B},
                {"name": "salt1", "prompts": [P_A], "salt": "tenant-b"},
                {"name": "salt2", "prompts": [P_A], "salt": "tenant-b"},
            ],
        },
        {"extra": {**emb_extra, "model_id": "another-model"}, "steps": [{"name": "A", "prompts": [P_A]}]},
        {"extra": emb_extra, "steps": [{"name": "A", "prompts": [P_A]}]},
    ]
    out["emb"], out["emb_log"] = _run({"model": model, "engines": emb}, tmp, "emb")

    port = free_port()
    pool = subprocess.Popen(
        [sys.executable, "-P", "-m", "kvpool.cli.main", "up", "--host", "127.0.0.1", "--port", str(port),
         "--http-port", "0", "--data-port", "0", "--memory", "256MiB"],
        stdout=open(tmp / "pool.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    url = f"grpc://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                with Client(url, timeout=1) as c:
                    c.stats()
                break
            except Exception:
                assert time.time() < deadline and pool.poll() is None, (tmp / "pool.log").read_text()
                time.sleep(0.2)
        remote = {"chunk_size": C, "url": url, "timeout_ms": 500}
        a_steps = [{"name": "A", "prompts": [P_A]}, {"name": "D", "prompts": [P_D]}]
        out["A"], out["A_log"] = _run(
            {"model": model, "engines": [{"extra": remote, "steps": a_steps}]}, tmp, "A"
        )

        fp = _fingerprint(model)
        with Client(url, timeout=5) as c:
            out["pool_has_A"] = c.prefix_hits(chunk_keys(fp, P_A))
            # (f) corrupt chunk 1 of P_D: flip one payload byte, header untouched
            key = chunk_keys(fp, P_D)[1]
            value = bytearray(c.get(key))
            value[chunkfmt.HEADER_SIZE + 100] ^= 0xFF
            c.put(key, bytes(value))
            # negative control: well-formed chunks (right key, header, checksum) of wrong KV for P_N
            for k in chunk_keys(fp, P_N):
                spec = chunkfmt.ChunkSpec(k, fp.digest, "bfloat16", (2, 2, C, 2, 32), C)
                c.put(k, chunkfmt.encode(spec, bytes(random.Random(7).randbytes(spec.payload_size))))

        ready, go = str(tmp / "b.ready"), str(tmp / "b.go")
        b_steps = [
            {"name": "A", "prompts": [P_A]},
            {"name": "D", "prompts": [P_D]},
            {"name": "N", "prompts": [P_N]},
            {"name": "A_after_kill", "prompts": [P_A], "pause": [ready, go]},
            {"name": "E_after_kill", "prompts": [P_E]},
        ]
        spec_b = {"model": model, "engines": [{"extra": remote, "steps": b_steps}]}
        proc_b = _run(spec_b, tmp, "B", wait=False)
        deadline = time.time() + 240
        while not os.path.exists(ready):
            assert proc_b.poll() is None and time.time() < deadline, (tmp / "B.log").read_text()[-4000:]
            time.sleep(0.1)
        with Client(url, timeout=5) as c:
            out["corrupt_key_left"] = c.get(key) is not None
        pool.send_signal(signal.SIGKILL)  # (e) the pool dies mid-run
        pool.wait(timeout=10)
        Path(go).touch()
        out["B"], out["B_log"] = _finish(proc_b, spec_b, tmp, "B")
    finally:
        if pool.poll() is None:
            pool.kill()
    return out


def _ref(runs, name: str) -> list[int]:
    return runs["base"][0][name][0]["tokens"]


def test_a_embedded_second_request_retrieves_every_full_chunk(runs):
    e = runs["emb"][0]
    assert e["A1"][0]["cached"] == 0
    assert e["A2"][0]["cached"] == 320  # 5 full chunks of 330 tokens
    assert e["A1"][0]["tokens"] == e["A2"][0]["tokens"] == _ref(runs, "A")
    assert "Retrieved 320 of 330 tokens (5 chunks) from embedded pool" in runs["emb_log"]
    assert "Stored 320 tokens (5 chunks)" in runs["emb_log"]


def test_at_least_one_token_is_computed_and_short_prompts_miss(runs):
    e = runs["emb"][0]
    # 256 tokens = 4 chunks in the pool, but one token must be computed: the last chunk loads
    # up to the last 32-token block boundary before it
    assert e["X2"][0]["cached"] == 224
    assert e["X2"][0]["tokens"] == _ref(runs, "X")
    assert e["S1"][0]["cached"] == e["S2"][0]["cached"] == 0
    assert e["S2"][0]["tokens"] == _ref(runs, "S")


def test_c_partial_overlap_hits_exactly_the_common_full_chunks(runs):
    c = runs["emb"][0]["C"][0]
    assert c["cached"] == 128
    assert c["tokens"] == _ref(runs, "C")


def test_several_requests_per_batch(runs):
    e = runs["emb"][0]
    assert [r["cached"] for r in e["B1"]] == [0, 0, 0]
    assert [r["cached"] for r in e["B2"]] == [192, 192, 192]
    for i in range(3):
        assert e["B1"][i]["tokens"] == e["B2"][i]["tokens"] == _ref(runs, f"B{i}")


def test_d_cache_salt_isolates_tenants(runs):
    e = runs["emb"][0]
    assert e["salt1"][0]["cached"] == 0  # P_A is in the pool, but unsalted
    assert e["salt2"][0]["cached"] == 320  # the same tenant reuses its own
    assert e["salt2"][0]["tokens"] == _ref(runs, "A")


def test_d_another_model_fingerprint_gets_no_hits(runs):
    other = runs["emb"][1]["A"][0]
    assert other["cached"] == 0  # same disk dir, same tokens, another model id


def test_embedded_disk_pool_survives_an_engine_restart(runs):
    again = runs["emb"][2]["A"][0]
    assert again["cached"] == 320
    assert again["tokens"] == _ref(runs, "A")


def test_b_second_engine_retrieves_what_the_first_stored(runs):
    assert runs["A"][0]["A"][0]["cached"] == 0
    assert runs["pool_has_A"] == 5  # the keys computed here match the engine's: fingerprint is stable
    b = runs["B"][0]["A"][0]
    assert b["cached"] == 320
    assert b["tokens"] == _ref(runs, "A") == runs["A"][0]["A"][0]["tokens"]


def test_f_corrupted_chunk_is_a_miss_and_outputs_are_identical(runs):
    d = runs["B"][0]["D"][0]
    assert d["tokens"] == _ref(runs, "D")
    assert "rejected chunk" in runs["B_log"] and "checksum mismatch" in runs["B_log"]
    assert "Retrieved 64 of 140 tokens" in runs["B_log"]  # chunk 0 loaded, chunk 1 recomputed
    assert runs["corrupt_key_left"] is False  # the bad chunk was deleted from the pool


def test_negative_control_wrong_kv_would_change_the_output(runs):
    """Well-formed chunks holding the wrong KV do change the answer: the equality checks above
    are sensitive, so they would catch a connector that scattered KV to the wrong place."""
    n = runs["B"][0]["N"][0]
    assert n["cached"] == 192
    assert n["tokens"] != _ref(runs, "N")


def test_e_pool_killed_mid_run_requests_still_succeed(runs):
    b = runs["B"][0]
    assert b["A_after_kill"][0]["cached"] == 0
    assert b["A_after_kill"][0]["tokens"] == _ref(runs, "A")
    assert b["E_after_kill"][0]["tokens"] == _ref(runs, "E")
    assert "treating as a miss" in runs["B_log"]
