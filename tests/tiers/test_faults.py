"""Faults with real processes: valkey-server killed and restarted, the S3 server stopped and
restarted, a slow tier behind a delaying proxy. No request fails, no wrong byte is returned, the
queue stays bounded, and writes resume when the tier comes back."""

from __future__ import annotations

import os
import threading
import time

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.breaker import State
from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.server.tiers.redis import RedisTier
from kvpool.cachenode.server.tiers.s3 import S3Tier
from kvpool.cachenode.server.tiers.store import TieredStore

MiB = 1024 * 1024


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


def redis_tier(url: str, closing, **kw) -> RedisTier:
    opts = dict(
        redis_url=url,
        pool_name=f"f{os.urandom(3).hex()}",
        redis_part_size="1MiB",
        redis_timeout=0.3,
        tier_breaker_failures=2,
        tier_breaker_reset=0.2,
    )
    opts.update(kw)
    cfg = SharedTiersConfig.from_options(**opts)
    tier = RedisTier(cfg.redis, cfg.policy)
    closing(tier)
    return tier


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Traffic:
    """Background readers and writers that check every byte they get back."""

    def __init__(self, tier, sizes=(1000, 300_000, 2 * MiB + 5)) -> None:
        self.tier = tier
        self.sizes = sizes
        self.expected: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.wrong = 0
        self.hits = 0
        self.reads = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._n = 0
        self.threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self.threads:
            t.join(10)

    def reads_more(self, n: int, timeout: float = 20.0) -> bool:
        """Until the reader has made ``n`` more reads than now (a barrier: what it asserts next
        holds for reads that really happened, not for a time that passed)."""
        target = self.reads + n
        return wait_until(lambda: self.reads >= target, timeout)

    def put(self) -> bytes:
        with self.lock:
            self._n += 1
            key = b"key-%d" % self._n
        value = os.urandom(self.sizes[self._n % len(self.sizes)])
        with self.lock:
            self.expected[key] = value
        self.tier.submit_put(key, value)
        return key

    def _write(self) -> None:
        try:
            while not self._stop.is_set():
                self.put()
                time.sleep(0.01)
        except BaseException as exc:
            self.errors.append(exc)

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                with self.lock:
                    keys = list(self.expected)[-8:]
                start = time.monotonic()
                values = self.tier.get_many(keys)
                self.slowest = max(self.slowest, time.monotonic() - start)
                for key, value in zip(keys, values, strict=True):
                    self.reads += 1
                    if value is not None:
                        self.hits += 1
                        if bytes(value) != self.expected[key]:
                            self.wrong += 1
                time.sleep(0.005)
        except BaseException as exc:
            self.errors.append(exc)


def test_valkey_killed_and_restarted_mid_run(own_valkey, closing):
    tier = redis_tier(own_valkey.url, closing)
    with Traffic(tier) as traffic:
        assert wait_until(lambda: traffic.hits > 10)
        own_valkey.kill()
        assert wait_until(lambda: tier.breaker.state is not State.CLOSED)
        assert counter(metrics.TIER_BREAKER_STATE, "redis") in (1, 2)
        assert traffic.reads_more(16)  # requests keep coming while the tier is down
        during = traffic.put()  # a write accepted while the tier is down
        hits_down = traffic.hits
        assert traffic.reads_more(16)  # a barrier: reads made after the snapshot, not a sleep
        assert traffic.hits == hits_down  # nothing can hit while it is down
        own_valkey.start()  # same port, empty memory
        assert wait_until(lambda: tier.breaker.state is State.CLOSED)
        assert wait_until(lambda: traffic.hits > hits_down + 10)
    assert traffic.errors == [] and traffic.wrong == 0
    # misses come after a short timeout (0.3 s), not a hang: 10x margin for a loaded 2-core machine
    assert traffic.slowest < 3.0
    assert tier.flush(10)
    assert bytes(tier.get_many([during])[0]) == traffic.expected[during]  # queued write resumed


def test_queue_stays_bounded_while_the_tier_is_down(own_valkey, closing):
    tier = redis_tier(own_valkey.url, closing, tier_queue_items=10)
    own_valkey.kill()
    tier.get_many([b"x"])
    tier.get_many([b"x"])  # two failures open the breaker
    dropped = counter(metrics.TIER_DROPPED_WRITES, "redis")
    values = {b"k%d" % i: os.urandom(100_000) for i in range(50)}
    for k, v in values.items():
        tier.submit_put(k, v)
    assert tier.queue.depth() <= 10
    assert counter(metrics.TIER_QUEUE_DEPTH, "redis") <= 10
    assert counter(metrics.TIER_DROPPED_WRITES, "redis") - dropped >= 40
    own_valkey.start()
    assert tier.flush(10)
    got = tier.get_many(list(values))
    # the newest writes survived the outage, the oldest were dropped
    assert all(bytes(got[i]) == values[b"k%d" % i] for i in range(45, 50))
    assert got[0] is None


def test_slow_tier_is_skipped_after_a_short_timeout(valkey_server, delay_proxy_factory, closing):
    proxy = delay_proxy_factory(valkey_server.port)
    tier = redis_tier(proxy.url, closing, redis_timeout=0.2, tier_breaker_reset=0.5)
    tier.submit_put(b"k", b"value")
    assert tier.flush(5)
    assert bytes(tier.get_many([b"k"])[0]) == b"value"
    proxy.delay = 3.0
    skipped = counter(metrics.TIER_SKIPPED, "redis", "get")
    for _ in range(2):
        start = time.monotonic()
        assert tier.get_many([b"k"]) == [None]
        # gave up before the slow answer (>= 3 s): the 0.2 s timeout with a 1.8 s margin for load
        assert time.monotonic() - start < 2.0
    assert tier.breaker.state is State.OPEN
    sent = proxy.received
    assert tier.get_many([b"k"]) == [None]
    assert proxy.received == sent  # open breaker: not even tried (no request reached the tier)
    assert counter(metrics.TIER_SKIPPED, "redis", "get") == skipped + 1
    proxy.delay = 0.0
    assert wait_until(lambda: tier.get_many([b"k"])[0] is not None, timeout=10)  # past a 3 s delay
    assert tier.breaker.state is State.CLOSED


def test_store_put_is_acknowledged_without_waiting_for_a_slow_tier(
    valkey_server, delay_proxy_factory, closing
):
    proxy = delay_proxy_factory(valkey_server.port)
    proxy.delay = 1.0
    tier = redis_tier(proxy.url, closing, redis_timeout=3.0)
    with TieredStore(64 * MiB, shared_tiers=[tier]) as store:
        values = [os.urandom(MiB) for _ in range(5)]
        for i, v in enumerate(values):
            assert store.put(b"k%d" % i, v)
        # every put was acknowledged while the shared tier had written none of them (each hop
        # through the proxy takes 1 s): a count, not a stopwatch
        assert tier.queue.written == 0
        assert bytes(store.get(b"k0")) == values[0]
        assert wait_until(lambda: proxy.received > 0)  # a barrier: the tier's write is on its way
        assert tier.queue.written == 0  # the shared tier is still busy with them
        proxy.delay = 0.0
        assert store.flush(20)
    fresh = redis_tier(valkey_server.url, closing, pool_name=tier.cfg.prefix.decode().split(":")[1])
    assert [bytes(v) for v in fresh.get_many([b"k%d" % i for i in range(5)])] == values


def _s3_tier(server, bucket, closing) -> S3Tier:
    cfg = SharedTiersConfig.from_options(
        s3_url=f"s3://{bucket}/faults",
        s3_endpoint=server.endpoint,
        s3_timeout=1.0,
        s3_read_part_size="1MiB",
        tier_breaker_failures=2,
        tier_breaker_reset=0.2,
    )
    tier = S3Tier(cfg.s3, cfg.policy)
    closing(tier)
    return tier


def test_s3_server_stopped_and_restarted(own_s3, closing):
    tier = _s3_tier(own_s3, own_s3.new_bucket(), closing)
    with Traffic(tier) as traffic:
        assert wait_until(lambda: traffic.hits > 10)
        own_s3.stop()
        assert wait_until(lambda: tier.breaker.state is not State.CLOSED)
        assert traffic.reads_more(16)
        during = traffic.put()
        hits_down = traffic.hits
        assert traffic.reads_more(16)  # a barrier: reads made after the snapshot, not a sleep
        assert traffic.hits == hits_down
        own_s3.start()  # same port; moto keeps its objects, like S3 would
        assert wait_until(lambda: tier.breaker.state is State.CLOSED)
        assert wait_until(lambda: traffic.hits > hits_down + 10)
    assert traffic.errors == [] and traffic.wrong == 0
    assert traffic.slowest < 3.0  # s3_timeout is 1 s: a 3x margin, not a hang
    assert tier.flush(20)
    assert bytes(tier.get_many([during])[0]) == traffic.expected[during]
