"""Miss reasons as the scheduler side counts them: vLLM's own request and scheduler output
objects, an in-process embedded pool, two workers' reports aggregated as vLLM does (the harness of
test_scheduler_logic.py); and SafePool's reasons for a pool that does not answer (a real socket)."""

from __future__ import annotations

from vllm import SamplingParams
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from kvpool.cli.devtools.local_servers import free_port
from kvpool.connector import metrics
from kvpool.connector.backend import SafePool, open_pool
from kvpool.connector.metadata import KVPoolWorkerMeta

from . import test_scheduler_logic as logic
from .enginetools import ids
from .test_scheduler_logic import Harness, _put_chunks, _report

config = logic.config  # its fixture: a vLLM config of the tiny model, TP=2


def _misses() -> dict[str, int]:
    """This process's miss counters so far (metrics.STATS.totals never resets)."""
    return {k[5:]: v for k, v in metrics.STATS.totals.items() if k.startswith("miss:")}


def _since(before: dict[str, int]) -> dict[str, int]:
    now = _misses()
    return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


def test_a_cold_request_is_counted_once_when_vllm_schedules_it(config):
    h = Harness(config)
    before = _misses()
    r = h.request("cold", ids(330, 21))
    ext, _ = h.lookup(r)
    ext, _ = h.lookup(r)  # vLLM asks again while the request waits: nothing is counted yet
    assert ext == 0 and _since(before) == {}
    h.admit(r)
    assert _since(before) == {"not_in_pool": 320, "partial_block": 10}
    h.conn.update_state_after_alloc(r, None, 0)  # scheduled again (e.g. after a preemption)
    assert _since(before) == {"not_in_pool": 320, "partial_block": 10}


def test_a_partial_hit_tells_the_workers_its_misses_and_counts_a_failed_load_once_over_ranks(config):
    """Chunks 0-2 of 5 are in the pool; the load fails on rank 0 at chunk 2 (evicted) and on rank 1
    at chunk 1 (corrupt): the first failed chunk and its reason count, once."""
    h = Harness(config)
    before = _misses()
    r = h.request("partial", ids(330, 22))
    _put_chunks(h, r, 3)
    assert h.admit(r) == 192
    assert _since(before) == {"not_in_pool": 128, "partial_block": 10}
    m1 = h.step(new=[(r, 330 - 192)])
    (load,) = m1.loads
    assert load.misses == {"not_in_pool": 128, "partial_block": 10}
    reports = [
        KVPoolWorkerMeta(step=m1.step, failed={"partial": 2}, why={"partial": "evicted"}),
        KVPoolWorkerMeta(step=m1.step, failed={"partial": 1}, why={"partial": "corrupt"}),
    ]
    agg = reports[0].aggregate(reports[1])
    assert (agg.failed, agg.why) == ({"partial": 1}, {"partial": "corrupt"})
    h.conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=agg))
    assert _since(before) == {"not_in_pool": 128, "partial_block": 10, "load_failed:corrupt": 128}
    h.conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=agg))  # not again
    assert _since(before)["load_failed:corrupt"] == 128


def test_an_evicted_chunk_is_its_own_reason(config):
    h = Harness(config)
    before = _misses()
    r = h.request("evicted", ids(330, 23))
    _put_chunks(h, r, 5)
    assert h.admit(r) == 320
    m1 = h.step(new=[(r, 10)])
    worker = KVPoolWorkerMeta(step=m1.step, failed={"evicted": 4}, why={"evicted": "evicted"})
    h.conn.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=worker))
    assert _since(before) == {"partial_block": 10, "evicted": 64}


def test_a_request_that_cannot_be_keyed_is_refused_with_its_feature(config):
    h = Harness(config)
    tokens = ids(330, 24)
    _put_chunks(h, h.request("twin", tokens), 5)
    before = _misses()
    image = MultiModalFeatureSpec(
        data=None, modality="image", identifier="", mm_position=PlaceholderRange(0, 100)
    )
    r = h.request("no-id", tokens, mm_features=[image])
    assert h.admit(r) == 0
    assert _since(before) == {"refused:multimodal": 330}


def test_an_engine_the_connector_refused_counts_every_request_as_refused_engine(config):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.connector.vllm import KVPoolConnector

    conn = KVPoolConnector(config(2), KVConnectorRole.SCHEDULER)
    conn.set_xfer_handshake_metadata_pp_aware({(0, 0): _report(0), (0, 1): _report(1, refusals=["MLA"])})
    before = _misses()
    r = Request("off", ids(330, 25), SamplingParams(max_tokens=1), None)
    assert conn.get_num_new_matched_tokens(r, 64) == (0, False)
    conn.update_state_after_alloc(r, None, 0)
    conn.update_state_after_alloc(r, None, 0)  # counted once
    assert _since(before) == {"refused:engine": 266}


def test_safepool_says_why_a_pool_gave_no_answer():
    """A URL nobody listens on: each lookup and read says why (a real socket, refused), and
    once the breaker opens, that it was not sent at all."""
    pool = open_pool(
        f"grpc://127.0.0.1:{free_port()}", memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=0.3
    )
    n, lease, why = pool.lookup([b"k" * 32], 1000)
    assert (n, lease) == (0, 0) and why in ("error", "timeout")
    held, get_why = pool.fetch_into([b"k" * 32])
    assert held == [None] and get_why in ("pool_error", "timeout")
    for _ in range(3):
        pool.lookup([b"k" * 32], 1000)
    assert pool.lookup([b"k" * 32], 1000)[2] == "breaker_open"
    assert SafePool(None).lookup([b"k" * 32], 0)[2] == "no_pool"


def test_safepool_a_pool_that_never_answers_is_a_timeout():
    """A socket that accepts and stays silent: the call fails at its deadline, whatever the error
    says, and that is a timeout."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        pool = open_pool(
            f"grpc://127.0.0.1:{silent.getsockname()[1]}",
            memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=0.3,
        )  # fmt: skip
        assert pool.lookup([b"k" * 32], 1000)[2] == "timeout"
        assert pool.fetch_into([b"k" * 32])[1] == "timeout"


def test_safepool_an_absent_key_is_an_answer_not_a_failure(embedded):
    embedded.put_many([(b"a" * 32, b"v")])
    assert embedded.lookup([b"a" * 32, b"b" * 32], 1000)[0::2] == (1, None)
    held, why = embedded.fetch_into([b"b" * 32])
    assert held == [None] and why is None  # the loader calls such a chunk evicted


def test_the_loader_says_why_a_chunk_did_not_load(embedded):
    """Real paged caches and the embedded pool (test_transfer.py's helpers): a chunk the pool no
    longer holds is ``evicted``; one whose payload was flipped is ``corrupt``; one of another
    chunk format version is ``format_version``; the chunks before it load."""
    from kvpool.connector import chunkfmt
    from kvpool.connector.loader import Loader

    from .test_transfer import C, _blocks_of, _cache, _job, _save, _spec

    keys = [bytes([90 + i]) * 32 for i in range(4)]
    _save(_cache(5), embedded, keys, base=0).close()
    loader = Loader(_cache(6), embedded, _spec, C)
    blocks = [b for i in range(4) for b in _blocks_of(i, 20)]
    result = loader.run(_job(keys, blocks, 0, 4 * C))
    assert (result.failed_chunk, result.failed_why) == (None, None)

    embedded.delete([keys[3]])
    result = loader.run(_job(keys, blocks, 0, 4 * C))
    assert (result.ok_chunks, result.failed_chunk, result.failed_why) == (3, 3, "evicted")

    bad = bytearray(embedded.get_many([keys[2]])[0])
    bad[chunkfmt.HEADER_SIZE + 7] ^= 0xFF
    embedded.put_many([(keys[2], bytes(bad))])
    result = loader.run(_job(keys, blocks, 0, 4 * C))
    assert (result.ok_chunks, result.failed_chunk, result.failed_why) == (2, 2, "corrupt")

    other = bytearray(embedded.get_many([keys[1]])[0])
    other[4] ^= 0x7F  # the format version field (chunkfmt: magic, then a little-endian u16)
    embedded.put_many([(keys[1], bytes(other))])
    result = loader.run(_job(keys, blocks, 0, 4 * C))
    assert (result.ok_chunks, result.failed_chunk, result.failed_why) == (1, 1, "format_version")
    loader.close()
