"""Loads that keep failing, and failed loads shared by a burst, on real vLLM CPU engines.

Engines (one runner process each; prefix caching off unless said):
  base — no connector: the reference outputs; and the burst below with vLLM's prefix cache on
         and no connector, its cache-off reference (vLLM's prefix cache alone changes greedy
         near-ties: a request that computes 8 tokens over 512 cached ones is not bit-identical
         to one prefill of 520).
  ref  — an embedded pool with a disk dir that computes R from scratch: the reference bytes of
         R's chunks (a clean recompute).
  A    — remote pool (`kvpool up`): computes and stores V, S and Q.
Then, in the pool: V's chunk 0 is rewritten as another chunk format version (no engine of this
version can read it); every read of S's chunks answers after the connector's deadline (through
faultproxy.py); Q's chunk 1 gets a flipped payload byte.
  B1   — through the proxy, background loads (the default for a remote pool): V, then S. Each
         load fails at chunk 0; the request must recompute once, not load the same chunk again.
  B2   — through the proxy, loads inside the step and vLLM's prefix cache on: Q and R (= Q's
         first 320 tokens, then 200 of its own) with n = 2 samples each, all in one step. The
         load of Q fails at chunk 1, and every other request of that step read the blocks vLLM
         shares with it (R computed its chunks 5-7 over them).
The burst step sends W (1,500 tokens of its own) first: while the engine computes W's prefill,
every request of Q and R reaches the engine core, so they are all scheduled in the next step, as a
server's burst is (sent alone, the first would start before the others arrive).
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.server.tiers.disk import DiskTier
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector import chunkfmt
from kvpool.connector.keys import chunk_keys

from .enginetools import cut_at_the_deadline, fault_proxy, fingerprints, ids, loads, run, step_log, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

C = 64
TOKENS = 16
P_V = ids(330, 61)  # chunk 0 rewritten as another format version
P_S = ids(330, 62)  # every read times out
P_Q = ids(330, 63)  # chunk 1 corrupted; loaded inside a burst
# shares Q's 5 chunks, then 3 chunks of its own. vLLM's CPU engine is not batch-invariant: with
# its prefix cache on, a request that computes its tail beside others may pick another token at a
# near-tie than the same request alone (for tails of seed 64, 66 and 67 it does, within 16 tokens).
# These prompts are ones where it does not, which test_control_... below checks in every run.
P_R = P_Q[:320] + ids(200, 68)
P_W = ids(1500, 65)  # keeps the engine busy while the burst arrives
ALL = {"V": P_V, "S": P_S, "Q": P_Q, "R": P_R}
BURST = [{"name": "burst", "prompts": [P_W, P_Q, P_R], "n": 2}]


def _other_version(value: bytes) -> bytes:
    """The same chunk, declared as a format version this kvpool does not read."""
    out = bytearray(value)
    struct.pack_into("<H", out, 4, chunkfmt.FORMAT_VERSION + 1)
    return bytes(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failures")
    model = tiny_model(tmp / "tiny-llama")
    out: dict = {}
    steps = [{"name": k, "prompts": [v]} for k, v in ALL.items()]
    base = {"connector": False, "max_tokens": TOKENS, "steps": steps}
    ref_disk = str(tmp / "ref-disk")
    ref = {
        "extra": {"chunk_size": C, "disk_dir": ref_disk, "disk_size": "64MiB", "memory": "64MiB"},
        "max_tokens": TOKENS,
        "steps": [{"name": "R", "prompts": [P_R]}],
    }
    burst_off = {
        "connector": False,
        "prefix_caching": True,
        "max_tokens": TOKENS,
        "steps": BURST,
    }
    (out["base"], out["ref"], out["burst_off"]), _ = run(
        {"model": model, "engines": [base, ref, burst_off]}, tmp, "base"
    )
    out["ref_disk"] = ref_disk

    faults = tmp / "faults.json"
    with kvpool_up("--memory", "256MiB") as (_pool, url), fault_proxy(url, faults, tmp) as proxy:
        remote = {"chunk_size": C, "url": url, "timeout_ms": 500}
        a_steps = [{"name": k, "prompts": [ALL[k]]} for k in ("V", "S", "Q")]
        (out["A"],), a_log = run(
            {"model": model, "engines": [{"extra": remote, "max_tokens": TOKENS, "steps": a_steps}]}, tmp, "A"
        )
        fp = fingerprints(a_log)[(0, 0)]
        keys = {k: chunk_keys(fp, v) for k, v in ALL.items()}
        out["keys"] = keys
        with Client(url, timeout=5) as c:
            out["clean"] = {k: [c.get(key) for key in keys[k]] for k in ("V", "S", "Q")}
            assert all(v is not None for vs in out["clean"].values() for v in vs), "A stored everything"
            out["other_version_V0"] = _other_version(out["clean"]["V"][0])
            c.put(keys["V"][0], out["other_version_V0"])
            corrupt = bytearray(out["clean"]["Q"][1])
            corrupt[chunkfmt.HEADER_SIZE + 100] ^= 0xFF
            c.put(keys["Q"][1], bytes(corrupt))
        faults.write_text(json.dumps({"always_slow_on_get": [k.hex() for k in keys["S"]], "slow_s": 1.5}))

        via_proxy = {**remote, "url": proxy}
        b1 = {
            "extra": via_proxy,
            "max_tokens": TOKENS,
            "steps": [{"name": k, "prompts": [ALL[k]]} for k in "VS"],
        }
        b2 = {
            # lookups answered within the first scheduling step: the whole burst runs in one step
            "extra": {**via_proxy, "load_async": "false", "lookup_wait_ms": 500},
            "prefix_caching": True,
            "max_tokens": TOKENS,
            "steps": BURST,
        }
        (out["B1"], out["B2"]), out["B_log"] = run({"model": model, "engines": [b1, b2]}, tmp, "B")
        faults.write_text("{}")
        with Client(url, timeout=5) as c:
            out["after"] = {k: [c.get(key) for key in keys[k]] for k in ALL}
    out["proxy_log"] = (tmp / "faultproxy.log").read_text()
    return out


def _ref(runs, name: str) -> list[int]:
    return runs["base"][name][0]["tokens"]


def _lookups(runs, name: str) -> int:
    """Lookups that asked for ``name``'s first chunk (each lookup starts at chunk 0)."""
    first = runs["keys"][name][0].hex()
    return sum(1 for line in runs["proxy_log"].splitlines() if line.startswith(f"lookup {first} "))


def test_a_chunk_of_another_format_is_tried_once_deleted_and_replaced(runs):
    v = runs["B1"]["V"][0]
    assert v["tokens"] == _ref(runs, "V")
    assert v["cached"] == 0  # the load failed at chunk 0: all recomputed
    assert 1 <= _lookups(runs, "V") <= 2
    assert "is of another format" in runs["B_log"]
    # gone: replaced by B1's recompute, the bytes a clean engine stored
    assert runs["after"]["V"][0] != runs["other_version_V0"]
    assert runs["after"]["V"] == runs["clean"]["V"]


def test_a_chunk_whose_reads_always_time_out_is_tried_once(runs):
    s = runs["B1"]["S"][0]
    assert s["tokens"] == _ref(runs, "S")
    assert s["cached"] == 0
    assert 1 <= _lookups(runs, "S") <= 2
    # each load failed because the proxy held the chunk past the deadline: a timeout, not a miss
    # (the connector's warning of a failed get is rate-limited: not evidence)
    assert f"slow get {runs['keys']['S'][0].hex()} " in runs["proxy_log"]
    s_loads = loads(step_log(runs["B_log"], "S"))
    assert s_loads and all(ok == 0 and cut_at_the_deadline(ms, 1.5) for ok, _, ms, _ in s_loads), s_loads
    v_loads = loads(step_log(runs["B_log"], "V"))  # the control: V's refused chunk fails at once
    assert v_loads and not any(cut_at_the_deadline(ms, 1.5) for _, _, ms, _ in v_loads), v_loads


def test_control_without_the_connector_the_burst_gives_each_prompts_own_output(runs):
    """The premise of the next test: with vLLM's prefix cache on and no connector, every sample of
    the burst equals its prompt's output computed alone (see P_R)."""
    off = runs["burst_off"]["burst"]
    assert [r["samples"] for r in off[1:]] == [[_ref(runs, "Q")] * 2, [_ref(runs, "R")] * 2]


def test_a_failed_load_in_a_burst_changes_no_output(runs):
    burst, off = runs["B2"]["burst"], runs["burst_off"]["burst"]
    assert [len(r["samples"]) for r in burst] == [2, 2, 2]
    assert [r["samples"] for r in burst] == [r["samples"] for r in off]
    assert [r["samples"] for r in burst[1:]] == [[_ref(runs, "Q")] * 2, [_ref(runs, "R")] * 2]
    assert "checksum mismatch" in runs["B_log"]


def test_after_a_failed_load_in_a_burst_every_chunk_is_a_clean_recompute(runs):
    """R computed its chunks 5-7 in the very step whose load of Q's chunk 1 failed, over blocks
    it shared with Q. What the pool holds afterwards is byte for byte a clean recompute."""
    assert runs["after"]["Q"] == runs["clean"]["Q"]
    tier = DiskTier(runs["ref_disk"], 1 << 30, name="ref-probe")
    tier.rebuild_index()
    ref_r = [tier.get(key) for key in runs["keys"]["R"]]
    assert None not in ref_r and None not in runs["after"]["R"]
    assert runs["after"]["R"] == [bytes(v) for v in ref_r]


def test_negative_control_the_reference_bytes_tell_prompts_apart(runs):
    """The byte comparison can fail: R's own chunks differ from Q's clean chunks at the same
    index, and the corrupted and other-version values differ from the clean ones."""
    assert runs["after"]["R"][5] not in runs["clean"]["Q"]
    assert runs["other_version_V0"] != runs["clean"]["V"][0]


def test_the_burst_shared_the_blocks_whose_load_failed(runs):
    """The scenario happened: vLLM rescheduled more than the request that loaded, because the
    other requests of the step read the blocks it shares with them."""
    found = re.findall(r"Recovered from KV load failure: (\d+) request", runs["B_log"])
    assert found and max(int(n) for n in found) >= 2, found
