"""The one write-behind queue and the one breaker as the store and the connector use them:
failures counted by kind, a discard that revokes a write in flight, drops handed back."""

from __future__ import annotations

import threading

from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.writebehind import WriteBehindQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_counts_failures_by_kind_and_a_success_resets_only_its_kind():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=2, reset_timeout=1.0, clock=clock)
    assert b.record_failure("get") is False
    b.record_success("lookup")  # lookups answer; reads still fail
    assert b.record_failure("get") is True  # the second read failure in a row opens it
    assert b.state is State.OPEN and not b.allow()
    assert b.record_failure("get") is False  # already open: nothing new
    clock.now += 1.0
    assert b.allow()  # the probe
    assert b.record_failure("lookup") is False  # a failed probe reopens, no new outage
    assert b.state is State.OPEN


def test_breaker_success_of_another_kind_does_not_forgive_failures():
    b = CircuitBreaker(failure_threshold=2, reset_timeout=1.0, clock=Clock())
    b.record_failure("get")
    b.record_success("put")
    b.record_failure("get")
    assert b.state is State.OPEN


def test_queue_discard_revokes_the_write_in_flight():
    entered, release = threading.Event(), threading.Event()
    wanted: list[bool] = []
    q: WriteBehindQueue

    def writer(batch):
        entered.set()
        assert release.wait(5)
        wanted.extend(q.still_wanted(k) for k, _ in batch)

    q = WriteBehindQueue("unit-revoke", writer, workers=1, batch_items=1)
    q.submit(b"k", b"v")
    assert entered.wait(5)
    assert q.in_flight(b"k") and b"k" not in q
    q.discard([b"k"])
    release.set()
    assert q.flush(5)
    assert wanted == [False] and not q.in_flight(b"k")
    q.close()


def test_queue_hands_back_what_it_dropped_and_keeps_buffers_uncopied():
    q = WriteBehindQueue(
        "unit-dropped", lambda batch: None, max_items=None, max_bytes=10, copy_values=False, autostart=False
    )
    first = bytearray(b"aaaa")
    assert q.submit(b"a", first) == []
    assert q.value_of(b"a") is first  # the owner handed it over: no copy
    assert q.submit(b"b", b"bbbb") == []
    assert q.submit(b"c", b"cccc") == [(b"a", first)]  # 12 bytes > 10: the oldest goes
    assert q.submit(b"big", b"x" * 11) == [(b"big", b"x" * 11)]  # can never fit
    assert q.pending_keys() == [b"b", b"c"] and q.pending_bytes == 8 and q.dropped == 2
    q.start()
    assert q.flush(5) and q.written == 2
    q.close()
