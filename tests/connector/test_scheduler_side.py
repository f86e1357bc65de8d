"""The connector's scheduler side on its own: a fake pool, fake requests, no engine, no vLLM config.

It is what ``KVPoolConnector`` runs in vLLM's engine core; here it is driven the way vLLM's
scheduler drives it (lookup, allocation, one ``build_connector_meta`` per step, the workers'
aggregated output), and what it sends the workers (metadata.py) is checked field by field.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from kvpool.cachenode.core.settings import load_settings
from kvpool.connector import lookup_wait, metrics
from kvpool.connector import scheduler as scheduler_module
from kvpool.connector.backend import SafePool
from kvpool.connector.keys import ModelFingerprint, chunk_keys
from kvpool.connector.metadata import KVPoolMetadata, KVPoolWorkerMeta, WorkerReport
from kvpool.connector.scheduler import ConnectorScheduler

C, BS = 64, 16


class FakePool:
    """The connector's pool protocol (backend.Pool) over a set of keys; every call is recorded."""

    name = "fake pool"

    def __init__(self, keys: set[bytes] = frozenset(), fail: bool = False) -> None:
        self.keys = set(keys)
        self.fail = fail
        self.lookups: list[int] = []  # number of keys of each lookup
        self.released: list[tuple[int, list[bytes] | None]] = []
        self._next_lease = 100

    def _prefix(self, keys) -> int:
        if self.fail:
            raise ConnectionError("pool unreachable")
        self.lookups.append(len(keys))
        n = 0
        while n < len(keys) and keys[n] in self.keys:
            n += 1
        return n

    def prefix_hits(self, keys) -> int:
        return self._prefix(keys)

    def lease_prefix(self, keys, lease_ms: int) -> tuple[int, int]:
        n = self._prefix(keys)
        self._next_lease += 1
        return n, self._next_lease if n else 0

    def release(self, lease_id: int, keys) -> None:
        self.released.append((lease_id, None if keys is None else list(keys)))


def fingerprint(report: WorkerReport) -> ModelFingerprint:
    return ModelFingerprint(
        model="", revision="", kv_dtype="bfloat16", kv_layout="LKTHD/cpu", num_layers=2,
        num_kv_heads=1, head_dim=32, chunk_size=C, tp_rank=int(report.tp_rank or 0), tp_size=2,
        weights=report.identity["weights"],
    )  # fmt: skip


def report(tp_rank: int, **kw) -> WorkerReport:
    fields = dict(
        tp_rank=tp_rank, pp_rank=0, refusals=[], backend="CPU_ATTN", layout="cpu", view_dtype="bfloat16",
        kv_quant="none", num_layers=2, num_kv_heads=1, head_dim=32, identity={"weights": "blake3:fake"},
    )  # fmt: skip
    return WorkerReport(**{**fields, **kw})


def request(req_id: str, n: int, seed: int = 0) -> SimpleNamespace:
    tokens = [(seed * 7919 + i * 31) % 30000 + 1 for i in range(n)]
    return SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, num_prompt_tokens=n)


def pool_keys(r: SimpleNamespace, chunks: int, ranks: int = 2) -> set[bytes]:
    """Every rank's keys of ``r``'s first ``chunks`` chunks, as another engine would have stored."""
    fps = [fingerprint(report(t)) for t in range(ranks)]
    return {k for fp in fps for k in chunk_keys(fp, r.prompt_token_ids)[:chunks]}


class BlockTable:
    """vLLM's KVCacheManager as the scheduler side reads it: request → its blocks."""

    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}

    def get_block_ids(self, req_id: str):
        return (self.blocks[req_id],)


def scheduler(pool: FakePool, safe: SafePool | None = None, **extra) -> tuple[ConnectorScheduler, BlockTable]:
    side = ConnectorScheduler(
        load_settings({"chunk_size": C, "lookup_wait_ms": 1000, **extra}), safe or SafePool(pool),
        tp=2, pp=1, block_size=BS, fingerprint=fingerprint,
    )  # fmt: skip
    side.set_worker_reports({(0, 0): report(0), (0, 1): report(1)})
    gate = getattr(pool, "gate", None)
    if gate is not None:
        gate.set()
    side.warming.result(5)  # the connection is opened once the scheduler side turns on
    if gate is not None:
        gate.clear()
    assert pool.lookups == ([] if pool.fail else [1])
    pool.lookups.clear()
    table = BlockTable()
    side.bind_kv_cache_manager(table)
    return side, table


def matched(side: ConnectorScheduler, r, computed: int = 0) -> tuple[int, bool]:
    for _ in range(2000):
        answer = side.get_num_new_matched_tokens(r, computed)
        if answer[0] is not None:
            return answer
        time.sleep(0.001)
    raise AssertionError("the lookup never answered")


def step(side: ConnectorScheduler, new=(), running=()) -> KVPoolMetadata:
    """One scheduling step: ``new`` / ``running`` = [(request, computed tokens, scheduled tokens)]."""
    return side.build_connector_meta(
        SimpleNamespace(
            total_num_scheduled_tokens=sum(n for _, _, n in [*new, *running]),
            preempted_req_ids=set(),
            scheduled_new_reqs=[
                SimpleNamespace(req_id=r.request_id, num_computed_tokens=c) for r, c, _ in new
            ],
            scheduled_cached_reqs=SimpleNamespace(
                req_ids=[r.request_id for r, _, _ in running], num_computed_tokens=[c for _, c, _ in running]
            ),
            num_scheduled_tokens={r.request_id: n for r, _, n in [*new, *running]},
        )
    )


def output(side: ConnectorScheduler, meta: KVPoolMetadata, failed: dict[str, int] | None = None) -> None:
    side.update_connector_output(
        SimpleNamespace(
            finished_recving=None,
            invalid_block_ids=None,
            kv_connector_worker_meta=KVPoolWorkerMeta(step=meta.step, failed=dict(failed or {})),
        )
    )


def test_a_cached_prefix_is_matched_chunk_by_chunk_and_pinned():
    r = request("hit", 330)
    pool = FakePool(pool_keys(r, 3))
    side, _ = scheduler(pool)
    assert matched(side, r) == (3 * C, False)
    assert pool.lookups == [5 * 2]  # 5 full chunks x 2 ranks, in one lookup
    assert matched(side, r, computed=2 * C) == (C, False)  # vLLM had two chunks itself


def test_a_chunk_counts_only_when_every_rank_holds_its_shard():
    r = request("shard", 330, seed=1)
    rank1_chunk2 = chunk_keys(fingerprint(report(1)), r.prompt_token_ids)[2]
    side, _ = scheduler(FakePool(pool_keys(r, 3) - {rank1_chunk2}))
    assert matched(side, r) == (2 * C, False)


def test_at_least_one_prompt_token_is_left_to_compute():
    r = request("whole", 3 * C, seed=2)  # every chunk of the prompt is in the pool
    side, _ = scheduler(FakePool(pool_keys(r, 3)))
    assert matched(side, r) == (3 * C - BS, False)  # the last block is computed


def test_nothing_is_matched_when_the_pool_fails():
    r = request("down", 330, seed=3)
    pool = FakePool(pool_keys(r, 3), fail=True)
    side, _ = scheduler(pool)
    assert matched(side, r) == (0, False)
    assert pool.lookups == [] and pool.released == []


def test_nothing_is_looked_up_until_every_worker_reported():
    r = request("early", 330, seed=4)
    pool = FakePool(pool_keys(r, 3))
    side = ConnectorScheduler(
        load_settings({"chunk_size": C}), SafePool(pool), tp=2, pp=1, block_size=BS, fingerprint=fingerprint
    )
    assert side.get_num_new_matched_tokens(r, 0) == (0, False)
    side.set_worker_reports({(0, 0): report(0)})
    assert not side.enabled and side.get_num_new_matched_tokens(r, 0) == (0, False)
    side.set_worker_reports({(0, 0): report(0), (0, 1): report(1, refusals=["MLA"])})
    assert not side.enabled
    assert pool.lookups == []


def test_the_metadata_orders_the_load_then_the_confirmed_saves():
    r = request("meta", 330, seed=5)
    pool = FakePool(pool_keys(r, 3))
    side, table = scheduler(pool)
    ext, _ = matched(side, r)
    table.blocks["meta"] = list(range(500, 521))  # 21 blocks of 16 for 330 tokens (+ room)
    side.update_state_after_alloc(r, ext)
    m1 = step(side, new=[(r, ext, 330 - ext)])
    (load,) = m1.loads
    fp0, fp1 = fingerprint(report(0)), fingerprint(report(1))
    keys0, keys1 = chunk_keys(fp0, r.prompt_token_ids), chunk_keys(fp1, r.prompt_token_ids)
    assert (load.req_id, load.first_chunk, load.start_token, load.end_token) == ("meta", 0, 0, 3 * C)
    assert load.keys == {0: keys0[:3], 1: keys1[:3]} and load.prompt_tokens == 330
    assert load.block_ids == list(range(500, 512)) and not load.background
    assert load.lease_id == 101 and load.lease_keys == {0: keys0[:3], 1: keys1[:3]}
    assert m1.saves == [] and m1.step == 1 and not m1.idle
    m2 = step(side, running=[(r, 330, 1)])
    assert m2.saves == []  # step 1's output not seen yet
    output(side, m1)
    m3 = step(side, running=[(r, 331, 1)])
    (save,) = m3.saves
    assert (save.req_id, save.first_chunk) == ("meta", 3)  # chunks 0-2 are in the pool already
    assert save.keys == {0: keys0[3:5], 1: keys1[3:5]}
    assert save.block_ids == list(range(512, 520))


def test_a_failed_load_stores_nothing_of_its_step_and_is_not_loaded_again():
    r = request("fail", 330, seed=6)
    pool = FakePool(pool_keys(r, 3))
    side, table = scheduler(pool)
    ext, _ = matched(side, r)
    table.blocks["fail"] = list(range(21))
    side.update_state_after_alloc(r, ext)
    m1 = step(side, new=[(r, ext, 330 - ext)])
    output(side, m1, failed={"fail": 1})
    m2 = step(side, running=[(r, C, 330 - C)])  # vLLM recomputes from chunk 1
    assert m2.saves == []
    output(side, m2)
    m3 = step(side, running=[(r, 330, 1)])
    assert [(s.first_chunk, len(s.keys[0])) for s in m3.saves] == [(1, 4)]
    lookups = len(pool.lookups)
    assert matched(side, r, computed=C) == (0, False)  # chunk 1 failed: never loaded again
    assert len(pool.lookups) == lookups


def test_a_finished_request_keeps_its_blocks_until_its_chunks_are_stored():
    r = request("done", 200, seed=7)
    side, table = scheduler(FakePool())
    assert matched(side, r) == (0, False)
    table.blocks["done"] = list(range(13))
    side.update_state_after_alloc(r, 0)
    m1 = step(side, new=[(r, 0, 200)])
    assert side.request_finished(r) == (True, None)
    output(side, m1)
    m2 = step(side)
    assert [(s.first_chunk, len(s.keys[0])) for s in m2.saves] == [(0, 3)]
    assert m2.released == ["done"] and m2.idle


def test_a_lookup_that_will_not_be_loaded_releases_its_lease():
    r = request("unused", 330, seed=8)
    pool = FakePool(pool_keys(r, 3))
    side, _ = scheduler(pool)
    assert matched(side, r, computed=3 * C) == (0, False)  # vLLM's own prefix cache had it all
    assert pool.released == [(101, None)]


# -- how long the scheduler waits for a lookup (lookup_wait.py) -----------------------------------


class GatedPool(FakePool):
    """A pool whose lookups answer only once ``gate`` is set: a slow or stalled pool."""

    def __init__(self, keys: set[bytes] = frozenset()) -> None:
        super().__init__(keys)
        self.gate = threading.Event()

    def _prefix(self, keys) -> int:
        self.gate.wait(30)
        return super()._prefix(keys)


def skips() -> int:
    return metrics.STATS.totals["lookup_skipped_steps"]


def budgets(side: ConnectorScheduler) -> list[float]:
    """Every wait the scheduler allows itself for a lookup from now on: what is checked is how long
    it chose to wait (a count), not a stopwatch on a loaded 2-core machine."""
    taken: list[float] = []
    real = side._wait.budget

    def spy(*args, **kwargs) -> float:
        taken.append(real(*args, **kwargs))
        return taken[-1]

    side._wait.budget = spy
    return taken


def timed(side: ConnectorScheduler, r, computed: int = 0) -> tuple[tuple[int | None, bool], float]:
    t0 = time.perf_counter()
    answer = side.get_num_new_matched_tokens(r, computed)
    return answer, time.perf_counter() - t0


def test_a_fast_pool_answers_within_the_call(monkeypatch):
    """A healthy pool's lookup is waited for: vLLM never hears "not known yet", no request waits a
    step, hit or miss. (The floor is raised so that a loaded test machine's thread wake-ups cannot
    fail the test; what is checked is that the answer is taken within the call.)"""
    monkeypatch.setattr(lookup_wait, "FLOOR_S", 0.2)
    hit = request("fast-hit", 330, seed=20)
    pool = FakePool(pool_keys(hit, 3))
    side, _ = scheduler(pool, lookup_wait_ms=200)
    before = skips()
    answers = [side.get_num_new_matched_tokens(request(f"fast{i}", 330, seed=21 + i), 0) for i in range(40)]
    assert answers == [(0, False)] * 40
    assert side.get_num_new_matched_tokens(hit, 0) == (3 * C, False)
    assert skips() == before and len(pool.lookups) == 41


def test_a_slow_pool_skips_the_request_a_step_and_counts_it():
    """A lookup that outlasts the wait: vLLM is told "not known yet" (None) and the skip is counted;
    while that lookup is unanswered the pool is stalled, so neither it nor a new request is waited
    for again; once the pool answers, the answer is taken."""
    hit = request("slow-hit", 330, seed=30)
    pool = GatedPool(pool_keys(hit, 3))
    side, _ = scheduler(pool, lookup_wait_ms=100)
    before = skips()
    waits = budgets(side)
    (answer, first) = timed(side, hit)
    assert answer == (None, False) and first >= 0.09  # waited up to the cap (nothing known yet)
    assert waits == [0.1]
    again, _ = timed(side, hit)
    other, _ = timed(side, request("slow-other", 330, seed=31))
    assert again == other == (None, False)
    assert waits == [0.1, 0.0, 0.0]  # a stalled pool is not waited for again
    assert skips() - before == 3
    pool.gate.set()
    assert matched(side, hit) == (3 * C, False)


def test_a_pool_whose_breaker_is_open_is_not_waited_for():
    """Failed lookups open the pool's breaker: then a new request's answer is a miss at once (the
    pool is skipped and would answer a miss anyway), not a wait and not a skipped step."""
    down = FakePool(fail=True)
    side, _ = scheduler(down, safe=SafePool(down, breaker_failures=1, breaker_s=60), lookup_wait_ms=300)
    # the scheduler's warm-up lookup failed: the breaker is open
    assert side._pool.skipping() and matched(side, request("opens", 330, seed=40)) == (0, False)
    busy = threading.Event()  # both lookup threads busy: a lookup sent now answers late
    held = [side._lookups().submit(busy.wait, 30) for _ in range(2)]
    before = skips()
    waits = budgets(side)
    try:
        for i in range(5):
            answer, _ = timed(side, request(f"while-open{i}", 330, seed=41 + i))
            assert answer == (0, False)
        assert not any(waits), waits  # a miss at once: no wait for the busy lookup threads
    finally:
        busy.set()
    assert skips() == before and down.lookups == [] and all(h.result(5) for h in held)


def test_an_answer_that_loads_nothing_is_remembered_then_asked_again_in_the_background(monkeypatch):
    """vLLM asks about a waiting request every step until it can be scheduled: a miss is not looked
    up again every step. After ``MISS_RECHECK_S`` it is asked again, the old answer standing
    (no skipped step) until the new one arrives: another engine may have stored the prefix."""
    monkeypatch.setattr(scheduler_module, "MISS_RECHECK_S", 0.2)
    r = request("remembered", 330, seed=50)
    pool = FakePool()
    side, _ = scheduler(pool)
    before = skips()
    assert matched(side, r) == (0, False)
    for _ in range(20):  # vLLM could not schedule it: asked again every step
        assert side.get_num_new_matched_tokens(r, 0) == (0, False)
    assert len(pool.lookups) == 1
    pool.keys |= pool_keys(r, 2)  # another engine stores two chunks meanwhile
    time.sleep(0.25)
    answers = [side.get_num_new_matched_tokens(r, 0)]
    while answers[-1] == (0, False) and len(answers) < 2000:  # the old answer stands meanwhile
        time.sleep(0.001)
        answers.append(side.get_num_new_matched_tokens(r, 0))
    assert answers[-1] == (2 * C, False)
    assert len(pool.lookups) == 2 and skips() == before


def test_a_remembered_answer_without_pins_is_not_loaded_from():
    """The pool held three chunks but vLLM had them itself, so the lease was released. Should vLLM
    lose its own copy (computed 0), the answer is not reused: it pinned nothing any more, so the
    pool is asked again and its new lease covers the load."""
    r = request("unpinned", 330, seed=51)
    pool = FakePool(pool_keys(r, 3))
    side, _ = scheduler(pool)
    assert matched(side, r, computed=3 * C) == (0, False)
    assert pool.released == [(101, None)] and len(pool.lookups) == 1
    assert matched(side, r, computed=3 * C) == (0, False)
    assert len(pool.lookups) == 1  # loads nothing: remembered
    assert matched(side, r, computed=0) == (3 * C, False)
    assert len(pool.lookups) == 2 and side._state(r).lease[0] == 102


@pytest.mark.parametrize("load", [True, False])
def test_a_pool_that_never_answers_costs_at_most_the_cap_once(load):
    """A stalled pool and a burst of new requests: the scheduler waits at most once, for the first."""
    pool = GatedPool()
    side, _ = scheduler(pool, lookup_wait_ms=50, load=load)
    waits = budgets(side)
    for i in range(10):
        timed(side, request(f"burst{i}", 330, seed=60 + i))
    assert waits[:1] == [0.05] and not any(waits[1:]), waits  # the cap once, then no wait at all
    pool.gate.set()


def test_skipped_steps_and_lookups_reach_vllms_stats():
    """The counters travel vLLM's connector-stats path (what `vllm serve`'s /metrics and its
    "KV Transfer metrics" log line show)."""
    from kvpool.connector.vllm_metrics import KVPoolConnectorStats

    pool = GatedPool()
    side, _ = scheduler(pool, lookup_wait_ms=10)
    metrics.STATS.take()  # start a fresh interval
    r = request("stats", 330, seed=70)
    assert side.get_num_new_matched_tokens(r, 0) == (None, False)
    pool.gate.set()
    assert matched(side, r) == (0, False)
    out = KVPoolConnectorStats(data=metrics.STATS.take()).reduce()
    assert out["lookup_skipped_steps"] >= 1 and out["lookups"] == 1 and out["requests"] == 1
    assert out["avg_lookup_wait_ms"] > 0  # the scheduler waited (10 ms) for the first answer
