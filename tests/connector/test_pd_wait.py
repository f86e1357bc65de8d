"""The scheduler's wait for a prefill engine's chunks (connector/pd_wait.py), without an engine:
who announces, who waits, for how long, and what is counted."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from kvpool.connector import announce, metrics
from kvpool.connector.pd_wait import PrefillWaits

C = 32
KEYS = [bytes([i]) * 32 for i in range(1, 11)]  # 10 full chunks
TOKENS = 10 * C + 7


def request(params=None, rid="r1"):
    return SimpleNamespace(request_id=rid, kv_transfer_params=params)


def counts() -> dict[str, int]:
    return {k: metrics.STATS.totals[k] for k in ("pd_wait_steps", "pd_wait_timeouts")}


def delta(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in counts().items()}


def consumer(bound_ms=200.0) -> PrefillWaits:
    return PrefillWaits(bound_ms, C, load=True, save=False, consumer=True)


def test_a_producer_announces_what_it_stores_and_a_kv_both_engine_only_when_asked():
    producer = PrefillWaits(1000, C, load=False, save=True, consumer=False)
    params = producer.announcement(request(), KEYS, 10)
    assert announce.read(params) == announce.Announcement(10, KEYS[9])
    both = PrefillWaits(1000, C, load=True, save=True, consumer=False)
    assert both.announcement(request(), KEYS, 10) is None
    assert both.announcement(request({"do_remote_decode": True}), KEYS, 10) == params
    assert consumer().announcement(request(), KEYS, 10) is None  # a consumer stores nothing
    assert producer.announcement(request(), KEYS, 0) is None


def test_an_announced_request_waits_until_its_chunks_are_found():
    waits, before = consumer(), counts()
    params = announce.announce(KEYS, 8).params()
    req = request(params)
    awaited = waits.hold(None, req, KEYS, TOKENS, found=3, limit=10)
    assert awaited.waiting and awaited.expect == 8
    assert waits.held(awaited)  # within its poll interval: no new lookup yet
    time.sleep(announce.POLL_S * 1.5)
    assert not waits.held(awaited)
    awaited = waits.hold(awaited, req, KEYS, TOKENS, found=8, limit=10)
    assert not awaited.waiting
    assert delta(before) == {"pd_wait_steps": 2, "pd_wait_timeouts": 0}
    assert waits.hold(awaited, req, KEYS, TOKENS, found=0, limit=10) is awaited  # never held again


def test_a_wait_ends_at_the_bound_counted_and_logged(caplog):
    waits, before = consumer(bound_ms=30), counts()
    req = request(announce.announce(KEYS, 8).params())
    awaited = waits.hold(None, req, KEYS, TOKENS, found=0, limit=10)
    time.sleep(0.05)
    with caplog.at_level("WARNING", logger="kvpool.connector.pd_wait"):
        awaited = waits.hold(awaited, req, KEYS, TOKENS, found=2, limit=10)
    assert not awaited.waiting
    assert delta(before) == {"pd_wait_steps": 1, "pd_wait_timeouts": 1}
    assert "8 expected, 2 found after" in caplog.text and "computing the rest" in caplog.text


@pytest.mark.parametrize(
    ("waits", "params", "found"),
    [
        (PrefillWaits(1000, C, load=True, save=True, consumer=False), None, 0),  # kv_both, no announcement
        (consumer(bound_ms=0), announce.announce(KEYS, 8).params(), 0),  # the wait turned off
        (consumer(), {"kvpool": {"chunks": 8, "key": "ab" * 32}}, 0),  # an announcement of other keys
        (consumer(), announce.announce(KEYS, 8).params(), 8),  # everything is there already
        (PrefillWaits(1000, C, load=False, save=True, consumer=False), None, 0),  # a producer never loads
    ],
)
def test_no_wait(waits, params, found):
    before = counts()
    assert not waits.hold(None, request(params), KEYS, TOKENS, found=found, limit=10).waiting
    assert delta(before) == {"pd_wait_steps": 0, "pd_wait_timeouts": 0}


def test_a_load_limit_caps_what_is_waited_for():
    awaited = consumer().hold(
        None, request(announce.announce(KEYS, 8).params()), KEYS, TOKENS, found=4, limit=4
    )
    assert not awaited.waiting


def test_a_consumer_waits_for_unannounced_requests_until_three_in_a_row_find_nothing():
    waits = consumer(bound_ms=1)
    for i in range(3):
        awaited = waits.hold(None, request(rid=f"r{i}"), KEYS, TOKENS, found=0, limit=10)
        assert awaited.waiting and awaited.expect == 10
        time.sleep(0.005)
        assert not waits.hold(awaited, request(rid=f"r{i}"), KEYS, TOKENS, found=0, limit=10).waiting
    assert not waits.hold(None, request(rid="r3"), KEYS, TOKENS, found=0, limit=10).waiting  # off now
    # an announced request is still waited for, and one that finds its chunks turns waiting back on
    ann = announce.announce(KEYS, 8).params()
    assert waits.hold(None, request(ann, rid="r4"), KEYS, TOKENS, found=0, limit=10).waiting
    assert not waits.hold(None, request(rid="r5"), KEYS, TOKENS, found=2, limit=10).waiting
    assert waits.hold(None, request(rid="r6"), KEYS, TOKENS, found=0, limit=10).waiting
