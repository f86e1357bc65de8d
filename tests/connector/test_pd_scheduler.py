"""Disaggregated prefill on the scheduler side, with a fake pool and no engine: a producer's
finished request announces its chunks; a consumer's request with that announcement is held ("not
known yet") until the pool holds them, or until announced_wait_ms has passed."""

from __future__ import annotations

import time

from kvpool.cachenode.core.settings import load_settings
from kvpool.connector import announce, metrics
from kvpool.connector.backend import SafePool
from kvpool.connector.keys import chunk_keys
from kvpool.connector.scheduler import ConnectorScheduler

from .test_scheduler_side import BS, BlockTable, C, FakePool, fingerprint, pool_keys, report, request


def side(pool: FakePool, role: str, **extra) -> ConnectorScheduler:
    s = ConnectorScheduler(
        load_settings({"chunk_size": C, "lookup_wait_ms": 1000, **extra}, env={}, kv_role=role), SafePool(pool),
        tp=2, pp=1, block_size=BS, fingerprint=fingerprint, consumer=role == "kv_consumer",
    )  # fmt: skip
    s.set_worker_reports({(0, 0): report(0), (0, 1): report(1)})
    s.warming.result(5)
    s.bind_kv_cache_manager(BlockTable())
    return s


def announced(r, chunks: int) -> dict:
    return announce.announce(chunk_keys(fingerprint(report(0)), r.prompt_token_ids), chunks).params()


def totals() -> tuple[int, int]:
    return metrics.STATS.totals["pd_wait_steps"], metrics.STATS.totals["pd_wait_timeouts"]


def test_a_producer_announces_the_chunks_of_a_finished_request():
    r = request("p", 5 * C + 10, seed=1)
    pool = FakePool(pool_keys(r, 3))
    producer = side(pool, "kv_producer")
    assert producer.get_num_new_matched_tokens(r, 0) == (0, False)  # a producer never loads
    _delay, params = producer.request_finished(r)
    assert params == announced(r, 3)


def test_a_consumer_request_is_held_until_the_announced_chunks_are_in_the_pool():
    r = request("c", 5 * C + 10, seed=2)
    r.kv_transfer_params = announced(r, 5)
    pool = FakePool()
    consumer = side(pool, "kv_consumer", announced_wait_ms=10_000)
    steps, timeouts = totals()
    for _ in range(3):
        assert consumer.get_num_new_matched_tokens(r, 0) == (None, False)
        time.sleep(announce.POLL_S)
    pool.keys |= pool_keys(r, 5)  # the producer's chunks land
    deadline = time.monotonic() + 5
    while (answer := consumer.get_num_new_matched_tokens(r, 0))[0] is None:
        assert time.monotonic() < deadline
        time.sleep(announce.POLL_S)
    assert answer == (5 * C, False)
    assert totals()[0] - steps >= 3 and totals()[1] == timeouts
    assert len(pool.lookups) >= 2  # asked again while held, not answered from a stale answer


def test_a_consumer_request_computes_after_the_bound():
    r = request("t", 5 * C + 10, seed=3)
    r.kv_transfer_params = announced(r, 5)
    pool = FakePool(pool_keys(r, 2))  # the producer died after two chunks
    consumer = side(pool, "kv_consumer", announced_wait_ms=60)
    _steps, timeouts = totals()
    t0 = time.monotonic()
    while (answer := consumer.get_num_new_matched_tokens(r, 0))[0] is None:
        assert time.monotonic() - t0 < 5
        time.sleep(announce.POLL_S)
    assert time.monotonic() - t0 >= 0.06
    assert answer == (2 * C, False)  # what is there is loaded, the rest computed
    assert totals()[1] == timeouts + 1


def test_a_kv_both_engine_does_not_wait_without_an_announcement():
    r = request("b", 5 * C + 10, seed=4)
    consumer = side(FakePool(), "kv_both", announced_wait_ms=10_000)
    steps, _ = totals()
    assert consumer.get_num_new_matched_tokens(r, 0) == (0, False)
    assert totals()[0] == steps
