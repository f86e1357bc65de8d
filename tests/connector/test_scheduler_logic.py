"""The scheduler side's decisions, step by step, with vLLM's own config, request and scheduler
output objects and an in-process embedded pool; no engine.

The engine tests show the outcome on one worker; this file drives what a tensor-parallel engine
of two workers would send: each worker's per-step report, aggregated the way vLLM's
KVOutputAggregator does (``KVConnectorWorkerMetadata.aggregate``) before the scheduler sees it.
The only stand-in is the scheduler's block table (``get_block_ids``), which the connector reads.
"""

from __future__ import annotations

import time
import uuid

import pytest
from vllm import SamplingParams
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from kvpool.connector import metrics
from kvpool.connector.backend import open_pool

from .enginetools import ids

C, BS = 64, 32


class BlockTable:
    """Stands in for vLLM's KVCacheManager.get_block_ids: request → its blocks (one group)."""

    block_pool = None

    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}
        self._next = 0

    def alloc(self, req_id: str, n_tokens: int) -> None:
        n = -(-n_tokens // BS)
        self.blocks[req_id] = list(range(self._next, self._next + n))
        self._next += n

    def get_block_ids(self, req_id: str):
        return (self.blocks[req_id],)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import EngineArgs

    from kvpool.cli.devtools.tinymodel import ensure_tiny_model

    model = str(ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama"))

    def make(tp: int, **extra):
        engine_id = f"unit-{uuid.uuid4().hex[:8]}"
        kv = KVTransferConfig(
            kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.connector.vllm",
            kv_role="kv_both", engine_id=engine_id, kv_connector_extra_config={"chunk_size": C, **extra},
        )  # fmt: skip
        args = EngineArgs(
            model=model, block_size=BS, max_model_len=2048, dtype="bfloat16", enforce_eager=True,
            tensor_parallel_size=tp, enable_prefix_caching=False, kv_transfer_config=kv,
        )  # fmt: skip
        return args.create_engine_config()

    return make


IDENTITY = {"weights": "blake3:test-weights", "vllm_version": "0.32.0", "torch_version": "2.x",
            "device_capability": "cpu:test"}  # fmt: skip


def _report(tp_rank: int, identity: dict | None = None, **kw):
    """A worker's report; ``identity`` entries replace those of IDENTITY."""
    from kvpool.connector.metadata import WorkerReport

    fields = dict(
        tp_rank=tp_rank, pp_rank=0, refusals=[], backend="CPU_ATTN", layout="cpu",
        view_dtype="bfloat16", kv_quant="none", num_layers=2, num_kv_heads=1, head_dim=32,
    )  # fmt: skip
    return WorkerReport(**{**fields, **kw}, identity={**IDENTITY, **(identity or {})})


class Harness:
    """A TP=2 scheduler-side connector on an embedded pool, and a minimal scheduler around it."""

    def __init__(self, config, **extra) -> None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from kvpool.connector.vllm import KVPoolConnector

        cfg = config(2, memory="64MiB", **extra)
        self.pool = open_pool(
            None, memory_bytes=64 << 20, disk_dir=None, disk_bytes=0, timeout_s=2,
            engine_id=cfg.kv_transfer_config.engine_id,
        )  # fmt: skip
        self.conn = KVPoolConnector(cfg, KVConnectorRole.SCHEDULER)
        self.conn.set_xfer_handshake_metadata_pp_aware({(0, 0): _report(0), (0, 1): _report(1)})
        self.table = BlockTable()
        self.conn.bind_kv_cache_manager(self.table)
        self.requests: dict[str, Request] = {}

    def request(self, req_id: str, tokens: list[int], **kw) -> Request:
        r = Request(req_id, tokens, SamplingParams(max_tokens=8), None, **kw)
        self.requests[req_id] = r
        return r

    def lookup(self, r: Request, computed: int = 0) -> tuple[int, bool]:
        """get_num_new_matched_tokens as vLLM's scheduler calls it: again in a later step while
        the answer is not known (None)."""
        for _ in range(1000):
            ext, load_async = self.conn.get_num_new_matched_tokens(r, computed)
            if ext is not None:
                return ext, load_async
            time.sleep(0.001)
        raise AssertionError("the lookup never answered")

    def admit(self, r: Request) -> int:
        """What the scheduler does for a waiting request: lookup, allocate, count external tokens."""
        ext, _ = self.lookup(r)
        self.table.alloc(r.request_id, r.num_prompt_tokens + 8)
        self.conn.update_state_after_alloc(r, None, ext)
        r.num_computed_tokens = ext
        return ext

    def step(self, new=(), running=(), preempted=()):
        """One scheduling step: ``new`` = [(request, tokens)], ``running`` = [(request, tokens)]."""
        out = SchedulerOutput.make_empty()
        out.scheduled_new_reqs = [
            NewRequestData.from_request(r, (self.table.blocks[r.request_id],)) for r, _ in new
        ]
        cached = CachedRequestData.make_empty()
        cached.req_ids = [r.request_id for r, _ in running]
        cached.num_computed_tokens = [r.num_computed_tokens for r, _ in running]
        cached.num_output_tokens = [0 for _ in running]
        cached.new_block_ids = [None for _ in running]
        out.scheduled_cached_reqs = cached
        out.num_scheduled_tokens = {r.request_id: n for r, n in [*new, *running]}
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        out.preempted_req_ids = set(preempted)
        meta = self.conn.build_connector_meta(out)
        for r, n in [*new, *running]:
            r.num_computed_tokens += n
        return meta

    def output(self, meta, failed_by_rank=({}, {}), finished_recving=None, invalid_block_ids=()):
        """Both workers' reports for ``meta``'s step, aggregated as vLLM does, then seen by the
        scheduler. ``failed_by_rank[r]`` = {request: first chunk that failed on worker r};
        ``finished_recving``: background loads every worker reported done."""
        from kvpool.connector.metadata import KVPoolWorkerMeta

        reports = [KVPoolWorkerMeta(step=meta.step, failed=dict(f)) for f in failed_by_rank]
        agg = reports[0]
        for other in reports[1:]:
            agg = agg.aggregate(other)
        self.conn.update_connector_output(
            KVConnectorOutput(
                kv_connector_worker_meta=agg,
                finished_recving=finished_recving,
                invalid_block_ids=set(invalid_block_ids),
            )
        )


def _saved(meta, req_id: str) -> list[int]:
    """Chunk indices ``meta`` tells the workers to store for a request."""
    return [t.first_chunk + i for t in meta.saves if t.req_id == req_id for i in range(len(t.keys[0]))]


def _put_chunks(h: Harness, r: Request, n: int) -> None:
    """Chunks [0, n) of ``r`` for both ranks, as a previous engine would have stored them."""
    st = h.conn.scheduler._state(r)
    if st.keys is None:  # hashed by the first lookup; here before it
        h.conn.scheduler._hash_keys(st, r)
    h.pool.put_many([(st.keys[rank][i], b"kv") for i in range(n) for rank in (0, 1)])


def test_chunks_are_stored_only_after_every_worker_reported_their_step(config):
    h = Harness(config)
    r = h.request("plain", ids(330, 1))
    assert h.admit(r) == 0
    m1 = h.step(new=[(r, 330)])
    assert _saved(m1, "plain") == []  # computed in this step: not confirmed yet
    m2 = h.step(running=[(r, 1)])
    assert _saved(m2, "plain") == []  # step 1's output not seen yet
    h.output(m1)
    m3 = h.step(running=[(r, 1)])
    assert _saved(m3, "plain") == [0, 1, 2, 3, 4]
    assert set(m3.saves[0].keys) == {0, 1}  # each rank stores its own shard
    assert m3.saves[0].keys[0] != m3.saves[0].keys[1]


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_load_that_failed_on_one_rank_stores_nothing_of_that_step_on_any_rank(config, failing_rank):
    """The pool holds chunks 0-2 of a 5-chunk prompt; the load fails at chunk 1 on one worker
    only. The step also completed chunks 3-4 — over the missing KV — and none of them is stored,
    by either rank; after vLLM recomputed from chunk 1, chunks 1-4 are stored."""
    unsaved = metrics.STATS.totals["unsaved_tokens"]  # a snapshot: the counter is process-wide
    h = Harness(config)
    r = h.request("tp", ids(330, 2))
    _put_chunks(h, r, 3)
    assert h.admit(r) == 192
    m1 = h.step(new=[(r, 330 - 192)])
    (load,) = m1.loads
    assert (load.start_token, load.end_token, load.first_chunk) == (0, 192, 0)
    failed = [{}, {}]
    failed[failing_rank] = {"tp": 1}
    h.output(m1, failed)
    r.num_computed_tokens = 64  # what vLLM's scheduler does with the failed blocks: recompute
    m2 = h.step(running=[(r, 330 - 64)])
    assert _saved(m2, "tp") == []  # nothing from the failed step, on any rank
    h.output(m2)
    m3 = h.step(running=[(r, 1)])
    assert _saved(m3, "tp") == [1, 2, 3, 4]
    assert metrics.STATS.totals["unsaved_tokens"] - unsaved == 2 * C  # chunks 3-4 of this run, not another's


def test_negative_control_without_a_failure_the_same_step_is_stored(config):
    """The same schedule with both workers loading fine: chunks 3-4 are stored right after the
    step's output, so the test above would catch a connector that ignored one rank's failure."""
    unsaved = metrics.STATS.totals["unsaved_tokens"]
    h = Harness(config)
    r = h.request("ok", ids(330, 2))
    _put_chunks(h, r, 3)
    h.admit(r)
    m1 = h.step(new=[(r, 330 - 192)])
    h.output(m1)
    m2 = h.step(running=[(r, 1)])
    assert _saved(m2, "ok") == [3, 4]
    assert metrics.STATS.totals["unsaved_tokens"] == unsaved  # the counter above moves only on a failure


def test_the_lookup_pins_what_it_found_until_the_workers_release_their_keys(config):
    h = Harness(config)
    store = h.pool.pool._store
    r = h.request("lease", ids(330, 3))
    _put_chunks(h, r, 3)
    h.admit(r)
    assert store.stats()["pinned_bytes"] == 6 * 2  # 3 chunks x 2 ranks of b"kv"
    (load,) = h.step(new=[(r, 138)]).loads
    assert load.lease_id > 0 and [len(load.lease_keys[k]) for k in (0, 1)] == [3, 3]
    h.pool.release(load.lease_id, load.lease_keys[0])  # worker 0 has read its shards
    assert store.stats()["pinned_bytes"] == 6
    h.pool.release(load.lease_id, load.lease_keys[1])
    assert store.stats()["pinned_bytes"] == 0 and store.stats()["leases"] == 0


def test_a_lookup_that_will_not_be_loaded_releases_its_pins_at_once(config):
    h = Harness(config)
    store = h.pool.pool._store
    r = h.request("local", ids(330, 4))
    _put_chunks(h, r, 3)
    ext, _ = h.lookup(r, 192)  # vLLM's own prefix cache had it all
    assert ext == 0
    assert store.stats()["pinned_bytes"] == 0


def test_a_finished_request_keeps_its_blocks_until_its_chunks_are_stored(config):
    h = Harness(config)
    r = h.request("short", ids(200, 5))
    h.admit(r)
    m1 = h.step(new=[(r, 200)])
    delay, _ = h.conn.request_finished(r, h.table.blocks["short"])  # max_tokens reached at once
    assert delay is True
    h.output(m1)
    m2 = h.step()
    assert _saved(m2, "short") == [0, 1, 2] and m2.released == ["short"]
    # a finished request whose step failed is released without storing anything
    f = h.request("short-fail", ids(200, 6))
    h.admit(f)
    m3 = h.step(new=[(f, 200)])
    assert h.conn.request_finished(f, h.table.blocks["short-fail"])[0] is True
    h.output(m3, ({"short-fail": 0}, {}))
    m4 = h.step()
    assert _saved(m4, "short-fail") == [] and m4.released == ["short-fail"]


def test_a_preempted_request_stores_nothing_it_computed_before(config):
    h = Harness(config)
    r = h.request("pre", ids(200, 7))
    h.admit(r)
    m1 = h.step(new=[(r, 200)])
    h.output(m1)
    m2 = h.step(preempted=["pre"])  # its blocks may already be another request's
    assert _saved(m2, "pre") == []


def test_requests_that_cannot_be_keyed_are_neither_loaded_nor_stored(config):
    h = Harness(config)
    tokens = ids(330, 8)
    plain = h.request("plain-twin", tokens)
    _put_chunks(h, plain, 5)
    before = metrics.STATS.totals["refused_requests"]
    image = MultiModalFeatureSpec(
        data=None, modality="image", identifier="", mm_position=PlaceholderRange(0, 100)
    )
    r = h.request("no-id", tokens, mm_features=[image])
    assert h.admit(r) == 0  # the same tokens are in the pool; still no load
    m1 = h.step(new=[(r, 330)])
    h.output(m1)
    m2 = h.step(running=[(r, 1)])
    assert m1.loads == [] and _saved(m2, "no-id") == []
    assert metrics.STATS.totals["refused_requests"] - before == 1


def test_the_cache_stays_off_until_every_worker_has_reported(config):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector

    conn = KVPoolConnector(config(2), KVConnectorRole.SCHEDULER)
    r = Request("x", ids(330, 9), SamplingParams(max_tokens=1), None)
    assert conn.get_num_new_matched_tokens(r, 0) == (0, False)  # no report yet
    conn.set_xfer_handshake_metadata_pp_aware({(0, 0): _report(0)})  # worker 1 missing
    assert conn.scheduler.enabled is False
    conn.set_xfer_handshake_metadata_pp_aware({(0, 0): _report(0), (0, 1): _report(1, refusals=["MLA"])})
    assert conn.scheduler.enabled is False
    conn.set_xfer_handshake_metadata_pp_aware({(0, 0): _report(0), (0, 1): _report(1)})
    assert conn.scheduler.enabled is True


def test_a_report_without_a_weights_digest_turns_the_cache_off(config):
    """Keys are never made from a model's name or path alone."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector

    conn = KVPoolConnector(config(2), KVConnectorRole.SCHEDULER)
    conn.set_xfer_handshake_metadata_pp_aware(
        {(0, 0): _report(0), (0, 1): _report(1, identity={"weights": ""})}
    )
    assert conn.scheduler.enabled is False


def test_the_fingerprint_is_the_reported_identity_not_the_model_path(config):
    import dataclasses

    from kvpool.cachenode.core.settings import load_settings
    from kvpool.connector.engine_config import fingerprint_for

    cfg = config(2)
    s = load_settings({"chunk_size": C})
    report = _report(1, identity={"cuda_version": "12.8", "attn_variant": "fa3"})
    fp = fingerprint_for(cfg, s, report)
    assert (fp.weights, fp.vllm_version, fp.torch_version, fp.cuda_version) == (
        "blake3:test-weights", "0.32.0", "2.x", "12.8",
    )  # fmt: skip
    assert (fp.device_capability, fp.attn_variant, fp.tp_rank) == ("cpu:test", "fa3", 1)
    assert fp.model == fp.revision == ""  # no path, no revision name: the weights say which model
    for field, value in [("weights", "blake3:other"), ("vllm_version", "0.33.0"), ("torch_version", "2.y"),
                         ("device_capability", "cuda:9.0"), ("attn_variant", "fa2")]:  # fmt: skip
        other = dataclasses.replace(report, identity={**report.identity, field: value})
        assert fingerprint_for(cfg, s, other).digest != fp.digest
    cfg.model_config.model = "/elsewhere/tiny-llama"  # the same weights at another path
    assert fingerprint_for(cfg, s, report) == fp
    named = fingerprint_for(cfg, load_settings({"chunk_size": C, "model_id": "mine"}), report)
    assert named.model == "mine" and named.weights == fp.weights and named.digest != fp.digest


def test_a_worker_that_cannot_tell_its_rank_turns_the_cache_off(config):
    """Outside a distributed group (no TP/PP rank to ask), the worker never assumes rank 0."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector

    conn = KVPoolConnector(config(2), KVConnectorRole.WORKER)
    assert any("rank is unknown" in r for r in conn.worker._refusals)
    assert conn.worker._pool.pool is None  # no pool opened, nothing loaded or stored


def test_background_loads_go_out_before_the_request_is_scheduled_and_failures_still_roll_back(config):
    """load_async: the hit is loaded while the request waits (vLLM's WAITING_FOR_REMOTE_KVS); the
    load fails at chunk 1 on one rank. Nothing of chunks 1-4 counts as saved: once vLLM computed
    them (after the load was reported finished), they are stored."""
    h = Harness(config, load_async="true")
    r = h.request("bg", ids(330, 12))
    _put_chunks(h, r, 3)
    ext, load_async = h.lookup(r)
    assert (ext, load_async) == (192, True)
    h.table.alloc("bg", 330 + 8)
    h.conn.update_state_after_alloc(r, None, ext)
    m1 = h.step()  # the request is not scheduled: it waits for its load
    (load,) = m1.loads
    assert load.background and (load.start_token, load.end_token) == (0, 192) and load.lease_id
    assert m1.idle
    h.output(m1, ({}, {"bg": 1}), finished_recving={"bg"})
    h.conn.update_state_after_alloc(r, None, 0)  # vLLM allocates again once the load is done
    r.num_computed_tokens = 64  # vLLM truncated the hit at the first failed block
    m2 = h.step(new=[(r, 330 - 64)])
    assert m2.loads == [] and _saved(m2, "bg") == []
    h.output(m2)
    m3 = h.step(running=[(r, 1)])
    assert _saved(m3, "bg") == [1, 2, 3, 4]


def test_a_request_aborted_during_its_background_load_leaves_the_blocks_to_vllm(config):
    """vLLM frees a request's blocks once its load is reported finished; the connector must not
    also hold them for a save (two owners of one free)."""
    h = Harness(config, load_async="true")
    r = h.request("abort", ids(330, 13))
    _put_chunks(h, r, 3)
    ext, _ = h.lookup(r)
    h.table.alloc("abort", 338)
    h.conn.update_state_after_alloc(r, None, ext)
    h.step()
    assert h.conn.request_finished(r, h.table.blocks["abort"]) == (False, None)


def test_a_slow_pool_never_holds_up_a_scheduling_step(config):
    """A pool that accepts connections and never answers: the lookup runs in the background;
    vLLM is told to ask again (None) instead of waiting for the pool's deadline, and once the
    deadline passed the answer is a miss."""
    import socket

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        url = f"grpc://127.0.0.1:{silent.getsockname()[1]}"
        conn = KVPoolConnector(config(1, url=url, timeout_ms=400), KVConnectorRole.SCHEDULER)
        conn.set_xfer_handshake_metadata_pp_aware({(0, 0): _report(0)})
        r = Request("slow", ids(330, 14), SamplingParams(max_tokens=1), None)
        assert conn.get_num_new_matched_tokens(r, 0) == (None, False)
        assert conn.get_num_new_matched_tokens(r, 0) == (None, False)  # still not known
        answers = []
        for _ in range(300):
            answers.append(conn.get_num_new_matched_tokens(r, 0))
            if answers[-1][0] is not None:
                break
            time.sleep(0.01)
        assert answers[-1] == (0, False)
    finally:
        silent.close()


def _count_lookups(h: Harness) -> list[int]:
    """The number of keys of every lookup the connector sends to its pool, from now on."""
    calls: list[int] = []
    inner = h.conn.scheduler._pool.pool
    ask = inner.lease_prefix

    def counted(keys, lease_ms):
        calls.append(len(keys))
        return ask(keys, lease_ms)

    inner.lease_prefix = counted
    return calls


@pytest.mark.parametrize("failed_chunk", [0, 1])
def test_a_chunk_whose_load_failed_is_never_loaded_again_by_that_request(config, failed_chunk):
    """A background load fails at ``failed_chunk`` while the pool still holds it (a read that
    times out, a chunk no engine can read). vLLM resets the request and asks again: the next
    lookup stops before that chunk (none at all when it was the first), so the request recomputes
    once instead of loading the same chunk round after round."""
    h = Harness(config, load_async="true")
    r = h.request(f"retry{failed_chunk}", ids(330, 30 + failed_chunk))
    _put_chunks(h, r, 3)
    lookups = _count_lookups(h)
    assert h.lookup(r) == (192, True)
    h.table.alloc(r.request_id, 338)
    h.conn.update_state_after_alloc(r, None, 192)
    m1 = h.step()
    h.output(m1, ({r.request_id: failed_chunk}, {}), finished_recving={r.request_id})
    for _ in range(3):  # vLLM truncates the request at the failed chunk and asks again
        computed = failed_chunk * C
        assert h.lookup(r, computed) == (0, False)
        h.conn.update_state_after_alloc(r, None, 0)
    assert lookups == [10]  # 5 chunks x 2 ranks, once
    r.num_computed_tokens = failed_chunk * C
    m2 = h.step(new=[(r, 330 - failed_chunk * C)])
    assert m2.loads == []
    h.output(m2)
    assert _saved(h.step(running=[(r, 1)]), r.request_id) == list(range(failed_chunk, 5))


def test_requests_that_read_a_block_whose_load_failed_store_nothing_of_that_step(config):
    """vLLM shares the blocks a request loads in a step with every same-prefix request scheduled
    in that step (a burst, n > 1 sampling). The load fails at chunk 1: vLLM reports the blocks
    as invalid, and the other request, which computed its chunks 3-4 over them, stores nothing
    of that step; once recomputed, its chunks are stored."""
    h = Harness(config)
    loader, reader = h.request("loader", ids(330, 40)), h.request("reader", ids(330, 40))
    _put_chunks(h, loader, 3)
    assert h.admit(loader) == 192
    h.table.blocks["reader"] = h.table.blocks["loader"][:6] + [900 + i for i in range(5)]
    assert h.lookup(reader, 192) == (0, False)  # vLLM's own prefix cache had it
    h.conn.update_state_after_alloc(reader, None, 0)
    reader.num_computed_tokens = 192
    m1 = h.step(new=[(loader, 330 - 192), (reader, 330 - 192)])
    invalid = h.table.blocks["loader"][2:6]  # chunks 1-2 of the load
    h.output(m1, ({"loader": 1}, {}), invalid_block_ids=invalid)
    loader.num_computed_tokens = reader.num_computed_tokens = 64  # vLLM: recompute from block 2
    m2 = h.step(running=[(loader, 330 - 64), (reader, 330 - 64)])
    assert _saved(m2, "reader") == [] and _saved(m2, "loader") == []
    h.output(m2)
    m3 = h.step(running=[(loader, 1), (reader, 1)])
    assert _saved(m3, "loader") == [1, 2, 3, 4]
    assert _saved(m3, "reader") == [1, 2, 3, 4]


def test_negative_control_a_request_that_shares_no_failed_block_stores_its_step(config):
    """The same schedule, but the invalid blocks are not the reader's: its chunks 3-4 are stored
    right after the step, so the test above would catch a connector that looked only at the
    request that loaded."""
    h = Harness(config)
    loader, reader = h.request("loader2", ids(330, 41)), h.request("reader2", ids(330, 41))
    _put_chunks(h, loader, 3)
    h.admit(loader)
    h.table.alloc("reader2", 338)
    assert h.lookup(reader, 192) == (0, False)
    h.conn.update_state_after_alloc(reader, None, 0)
    reader.num_computed_tokens = 192
    m1 = h.step(new=[(loader, 330 - 192), (reader, 330 - 192)])
    h.output(m1, ({"loader2": 1}, {}), invalid_block_ids=h.table.blocks["loader2"][2:6])
    m2 = h.step(running=[(loader, 1), (reader, 1)])
    assert _saved(m2, "reader2") == [3, 4] and _saved(m2, "loader2") == []


def test_fp8_kv_without_known_scales_is_refused_not_shared(config):
    """A quantised KV cache whose k/v scales the worker cannot read is a worker refusal (the cache
    turns off), never a fingerprint shared by every such engine; known scales are in the digest."""
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector
    from kvpool.connector.worker_report import kv_quant

    cfg = config(2)
    cfg.cache_config.cache_dtype = "fp8"
    conn = KVPoolConnector(cfg, KVConnectorRole.WORKER)
    layer = "model.layers.0.self_attn.attn"
    conn.register_kv_caches({layer: torch.zeros(4, 2, BS, 64, dtype=torch.uint8)})
    assert any("without known k/v scales" in r for r in conn.worker.report.refusals)
    assert conn.worker.report.kv_quant == "" and conn.worker.enabled is False

    class Attn(torch.nn.Module):
        kv_cache_dtype = "fp8"

        def __init__(self, k: float) -> None:
            super().__init__()
            self.register_buffer("_k_scale", torch.tensor(k))
            self.register_buffer("_v_scale", torch.tensor(1.0))

    digests = []
    for k in (1.0, 0.5):
        cfg.compilation_config.static_forward_context[layer] = Attn(k)
        digests.append(kv_quant(cfg, [layer]))
    assert None not in digests and digests[0] != digests[1]


def test_request_keys_are_hashed_once_in_a_lookup_thread(config):
    """The scheduler thread only creates the request's state; reading the prompt and hashing its
    keys happen once, in the lookup thread, and later lookups reuse them."""
    import threading

    h = Harness(config)
    threads: list[str] = []
    hash_keys = h.conn.scheduler._hash_keys

    def recorded(st, request):
        threads.append(threading.current_thread().name)
        return hash_keys(st, request)

    h.conn.scheduler._hash_keys = recorded
    r = h.request("threaded", ids(330, 50))
    assert h.conn.scheduler._state(r).keys is None
    h.lookup(r)
    h.conn.scheduler._drop_lease(h.conn.scheduler._state(r))
    h.conn.scheduler._state(r).lease = None
    h.lookup(r)  # a second lookup (the lease is gone): the keys are reused
    assert len(threads) == 1 and threads[0].startswith("kvpool-lookup")
    assert len(h.conn.scheduler._state(r).keys[0]) == 5


@pytest.mark.parametrize(("shutdown_timeout", "told"), [(0, True), (10, False)])
def test_the_engine_says_when_vllm_would_kill_it_before_its_saves_are_flushed(config, shutdown_timeout, told):
    """vLLM's --shutdown-timeout (default 0) is how long `vllm serve` lets its engine shut down on
    Ctrl-C or SIGTERM before killing it; shorter than the saver's flush deadline (5 s), the
    connector says so at start-up and names the flag."""
    import logging

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("kvpool")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cfg = config(1)
        cfg.shutdown_timeout = shutdown_timeout
        KVPoolConnector(cfg, KVConnectorRole.SCHEDULER)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    notes = [line for line in lines if "--shutdown-timeout" in line]
    assert bool(notes) == told, lines
    if told:
        assert "Run it with --shutdown-timeout 5" in notes[0]
