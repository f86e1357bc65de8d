"""The pool wrapper: every failure is a miss, a dead pool costs nothing after the breaker opens."""

from __future__ import annotations

import time

from kvpool.cachenode.core.settings import load_settings
from kvpool.connector import metrics
from kvpool.connector.backend import SafePool, open_pool
from kvpool.connector.pools import RendezvousPool


class _Boom:
    name = "boom"

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *a):
        self.calls += 1
        raise ConnectionError("down")

    prefix_hits = get_many = put_many = delete = _fail

    def close(self) -> None:
        pass


def test_failures_are_misses_and_counted():
    before = metrics.STATS.totals["errors"]
    pool = SafePool(_Boom())
    assert pool.prefix_hits([b"k" * 32]) == 0
    assert pool.get_many([b"k" * 32, b"j" * 32]) == [None, None]
    assert pool.put_many([(b"k" * 32, b"v")]) is False
    assert metrics.STATS.totals["errors"] - before == 3


def test_breaker_skips_a_failing_pool():
    boom = _Boom()
    pool = SafePool(boom, breaker_failures=2, breaker_s=60)
    for _ in range(5):
        pool.prefix_hits([b"k" * 32])
    assert boom.calls == 2  # the rest never reached the pool


class _ReadsTimeOut:
    """Lookups answer (the chunk is there), every read times out: a node whose data path hangs."""

    name = "reads-time-out"

    def __init__(self) -> None:
        self.lookups = self.reads = 0

    def prefix_hits(self, keys):
        self.lookups += 1
        return len(keys)

    def get_many(self, keys):
        self.reads += 1
        raise TimeoutError("read timed out")

    def close(self) -> None:
        pass


def test_failed_reads_open_the_breaker_even_when_lookups_succeed():
    slow = _ReadsTimeOut()
    pool = SafePool(slow, breaker_failures=3, breaker_s=60)
    for _ in range(5):  # what each request does: a lookup that finds its chunk, then a read
        if pool.prefix_hits([b"k" * 32]):
            assert pool.get_many_into([b"k" * 32]) == [None]
    assert (slow.lookups, slow.reads) == (3, 3)  # the breaker opened after the third failed read
    assert pool.prefix_hits([b"k" * 32]) == 0  # skipped: a miss at no cost


def test_a_successful_read_resets_the_read_failures():
    class _Flaky(_ReadsTimeOut):
        def get_many(self, keys):
            self.reads += 1
            if self.reads % 2:
                raise TimeoutError("read timed out")
            return [b"v"] * len(keys)

    flaky = _Flaky()
    pool = SafePool(flaky, breaker_failures=2, breaker_s=60)
    for _ in range(6):
        pool.get_many([b"k" * 32])
    assert flaky.reads == 6  # never two failures in a row: the breaker stayed closed


def test_remote_pool_that_is_down_answers_fast():
    pool = open_pool("grpc://127.0.0.1:9", memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=0.2)
    t0 = time.perf_counter()
    assert pool.prefix_hits([b"k" * 32]) == 0
    assert pool.get_many([b"k" * 32]) == [None]
    assert time.perf_counter() - t0 < 1.0  # refused at once or after the 0.2 s timeout: a 5x margin


def test_scheduler_without_the_workers_pool_is_a_miss(tmp_path):
    pool = SafePool(RendezvousPool(str(tmp_path / "missing.url"), 0.2))
    assert pool.prefix_hits([b"k" * 32]) == 0


def test_embedded_pool_round_trip_and_lookup_over_loopback():
    owner = open_pool(None, memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, timeout_s=1, engine_id="t-rt")
    assert owner.put_many([(b"a" * 32, b"x"), (b"b" * 32, b"y")])
    assert bytes(owner.get_many([b"a" * 32])[0]) == b"x"
    from kvpool.connector.backend import rendezvous_path

    sched = SafePool(RendezvousPool(rendezvous_path("t-rt"), 1))
    assert sched.prefix_hits([b"a" * 32, b"b" * 32, b"c" * 32]) == 2
    sched.close()


def test_a_pool_at_a_url_reads_into_the_clients_pooled_buffers():
    """KVPOOL_URL's pool (``UrlPool``) must hand out the client's receive buffers, not copies."""
    from kvpool.cachenode.client.buffers import PooledBuffer
    from kvpool.connector.backend import rendezvous_path
    from kvpool.connector.pools import UrlPool

    owner = open_pool(None, memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, timeout_s=1, engine_id="t-url")
    assert owner.put_many([(b"a" * 32, b"x" * 4096)])
    with open(rendezvous_path("t-url")) as f:
        url = f.read().strip()
    pool = SafePool(UrlPool(url, 1.0))
    held = pool.get_many_into([b"a" * 32, b"z" * 32])
    assert held[1] is None
    assert isinstance(held[0], PooledBuffer)
    assert bytes(held[0].view) == b"x" * 4096
    held[0].release()
    pool.close()


def test_settings_extra_config_beats_env_and_sizes_parse():
    s = load_settings(
        {"chunk_size": 128, "memory": "1GiB"}, env={"KVPOOL_CHUNK_SIZE": "64", "KVPOOL_URL": "grpc://x:1"}
    )
    assert s.chunk_size == 128 and s.memory == 1 << 30 and s.url == "grpc://x:1"
    assert load_settings({"disk_dir": "/tmp/x"}, env={}).disk_size == 8 << 30
    assert load_settings({"save": "false"}, env={}).save is False


def test_stats_take_and_merge():
    st = metrics.ConnectorStats()
    st.add("hit_tokens", 256)
    st.observe("load_seconds", 0.01)
    a = st.take()
    assert st.take() is None
    merged = metrics.merge(a, a)
    assert merged["counts"]["hit_tokens"] == 512 and len(merged["latencies"]["load_seconds"]) == 2


def test_an_install_without_the_embedded_pool_says_to_set_the_url(monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "kvpool.cachenode.server.embedded", None)  # as in a vLLM pod's payload
    with caplog.at_level("WARNING", logger="kvpool"):
        pool = open_pool(
            None, memory_bytes=1 << 20, disk_dir=None, disk_bytes=0, timeout_s=1, engine_id="t-none"
        )
    assert pool.pool is None and pool.prefix_hits([b"k" * 32]) == 0
    assert any("no embedded pool in this install; set KVPOOL_URL" in r.getMessage() for r in caplog.records)


def test_the_breaker_probes_the_pool_again_after_breaker_s():
    boom = _Boom()
    pool = SafePool(boom, breaker_failures=2, breaker_s=0.05)
    for _ in range(3):
        pool.prefix_hits([b"k" * 32])
    assert boom.calls == 2
    time.sleep(0.06)
    pool.prefix_hits([b"k" * 32])  # the probe, which fails: skipped again
    pool.prefix_hits([b"k" * 32])
    assert boom.calls == 3
