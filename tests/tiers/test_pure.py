"""Pure logic of the shared tiers: breaker transitions, config parsing, part layout, the queue."""

from __future__ import annotations

import threading
import time

import pytest

from kvpool.cachenode.core import metrics
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.settings.shared_tiers import (
    SharedTiersConfig,
    parse_redis_url,
    parse_s3_url,
    parse_ttl,
)
from kvpool.cachenode.core.writebehind import Skipped, WriteBehindQueue, stable_bytes
from kvpool.cachenode.server.tiers.redis import Manifest, part_count, split_value
from kvpool.cachenode.server.tiers.s3 import ranges

# -- breaker ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_probes_once():
    clock = Clock()
    seen: list[State] = []
    b = CircuitBreaker(failure_threshold=3, reset_timeout=1.0, clock=clock, on_change=seen.append)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the count: failures must be consecutive
    b.record_failure()
    b.record_failure()
    assert b.allow() and b.state is State.CLOSED
    b.record_failure()
    assert b.state is State.OPEN and not b.allow()
    assert b.retry_in() == pytest.approx(1.0)
    clock.now += 0.5
    assert not b.allow() and b.retry_in() == pytest.approx(0.5)
    clock.now += 0.5
    assert b.allow()  # the probe
    assert b.state is State.HALF_OPEN
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state is State.CLOSED and b.allow()
    assert seen == [State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_breaker_failed_probe_reopens_with_longer_wait_and_lost_probe_expires():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, max_reset_timeout=3.0, clock=clock)
    b.record_failure()
    clock.now += 1.0
    assert b.allow()
    b.record_failure()  # probe failed
    assert b.state is State.OPEN
    clock.now += 1.5
    assert not b.allow()  # wait doubled to 2 s
    clock.now += 0.5
    assert b.allow()
    # the probe never reports back: after the wait another probe is allowed
    assert not b.allow()
    clock.now += 2.0
    assert b.allow()
    b.record_failure()
    clock.now += 3.0
    assert b.allow()  # capped at max_reset_timeout
    b.record_success()
    b.record_failure()
    clock.now += 1.0
    assert b.allow()  # success reset the wait to reset_timeout


def test_breaker_rejects_bad_settings():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_timeout=5, max_reset_timeout=1)


# -- config -----------------------------------------------------------------------------------------


def test_redis_urls_parse_schemes_auth_db_and_tls():
    cfg = parse_redis_url("redis://cache:6380/2")
    assert (cfg.host, cfg.port, cfg.db, cfg.tls, cfg.password) == ("cache", 6380, 2, False, None)
    cfg = parse_redis_url("valkey://:s%40cret@h")
    assert (cfg.port, cfg.password, cfg.username) == (6379, "s@cret", None)
    cfg = parse_redis_url("rediss://kv:pw@h:6390/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none")
    assert cfg.tls and cfg.username == "kv" and cfg.tls_ca_file == "/ca.pem" and cfg.tls_cert_reqs == "none"
    assert "pw" not in cfg.display_url and "pw" not in repr(cfg)
    assert parse_redis_url("valkeys://h").tls


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h:6379", "scheme"),
        ("redis://", "no host"),
        ("redis://h:99999", "not a valid URL"),
        ("redis://h/abc", "must be a number"),
        ("redis://h?ssl_ca_certs=/x", "need rediss"),
        ("rediss://h?foo=1", "unknown options"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_redis_urls_say_what_is_wrong(url, message):
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_bad_redis_url_error_hides_the_password():
    with pytest.raises(ValueError) as info:
        parse_redis_url("redis://u:topsecret@h:notaport")
    assert "topsecret" not in str(info.value)


def test_s3_urls():
    cfg = parse_s3_url("s3://my-bucket/a/b/", endpoint="http://127.0.0.1:9000")
    assert (cfg.bucket, cfg.prefix, cfg.endpoint_url, cfg.path_style) == (
        "my-bucket",
        "a/b",
        "http://127.0.0.1:9000",
        True,
    )
    assert cfg.object_key("ab") == "a/b/ab"
    cfg = parse_s3_url("s3://my-bucket", pool="prod")
    assert cfg.prefix == "kvpool/prod" and not cfg.path_style and cfg.endpoint_url is None
    for url, message in [
        ("http://b/p", "must start with s3://"),
        ("s3:///p", "no bucket"),
        ("s3://Bad_Bucket/p", "not a valid S3 bucket"),
        ("s3://bucket?x=1", "must not have"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_s3_url(url)
    with pytest.raises(ValueError, match="s3-endpoint"):
        parse_s3_url("s3://bucket", endpoint="ftp://x")


def test_options_build_policy_and_validate():
    cfg = SharedTiersConfig.from_options(
        pool_name="llama3",
        redis_url="redis://h",
        redis_ttl="2h",
        s3_url="s3://bucket",
        tier_order="s3,redis",
        tier_write="write-back",
        tier_promote=False,
    )
    assert cfg.redis.prefix == b"kvpool:llama3:" and cfg.redis.ttl == 7200
    assert cfg.s3.prefix == "kvpool/llama3"
    assert cfg.enabled == ("s3", "redis")
    assert cfg.policy.write == "back" and cfg.policy.promote is False
    assert SharedTiersConfig.from_options(redis_url="redis://h", tier_order="s3").enabled == ()
    assert parse_ttl("0", "--redis-ttl") is None and parse_ttl("15m", "--redis-ttl") == 900
    for kwargs, message in [
        ({"pool_name": "bad name"}, "--pool-name"),
        ({"redis_url": "redis://h", "redis_part_size": "16MiB"}, "--redis-part-size"),
        ({"redis_url": "redis://h", "redis_ttl": "soon"}, "--redis-ttl"),
        ({"s3_endpoint": "http://x"}, "needs --s3-url"),
        ({"s3_url": "s3://bucket", "s3_part_size": "1MiB"}, "--s3-part-size"),
        ({"s3_url": "s3://bucket", "s3_read_part_size": "10"}, "--s3-read-part-size"),
        ({"tier_order": "redis,disk"}, "--tier-order"),
        ({"tier_write": "sideways"}, "--tier-write"),
        ({"tier_queue_size": "lots"}, "--tier-queue-size"),
        ({"redis_url": "redis://h", "redis_timeout": 0}, "--redis-timeout"),
    ]:
        with pytest.raises(ValueError, match=message):
            SharedTiersConfig.from_options(**kwargs)


def test_click_options_read_env(monkeypatch):
    import click
    from click.testing import CliRunner

    from kvpool.cli.node_options import shared_tier_options

    @click.command()
    @shared_tier_options
    def cmd(**kwargs):
        cfg = SharedTiersConfig.from_options(**kwargs)
        click.echo(f"{cfg.redis.host} {cfg.redis.ttl} {cfg.s3.bucket} {cfg.policy.write}")

    monkeypatch.setenv("KVPOOL_REDIS_URL", "redis://envhost")
    monkeypatch.setenv("KVPOOL_REDIS_TTL", "60")
    monkeypatch.setenv("KVPOOL_TIER_WRITE", "back")
    result = CliRunner().invoke(cmd, ["--s3-url", "s3://bucket"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "envhost 60.0 bucket back"


# -- layout -----------------------------------------------------------------------------------------


def test_value_split_and_manifest_roundtrip():
    value = memoryview(bytes(range(256)) * 100)
    parts = split_value(value, 1000)
    assert [p.nbytes for p in parts] == [1000] * 25 + [600]
    assert b"".join(parts) == value
    head = b"H" * 24 + b"key"
    m = Manifest(
        parts=26,
        part_size=1000,
        record_size=len(head) + value.nbytes,
        generation=b"g" * 8,
        record_header=head,
    )
    assert part_count(m.record_size, len(head), 1000) == 26
    assert ranges(10, 3, 4) == [(3, 6), (7, 9)]


# -- queue ------------------------------------------------------------------------------------------


def test_queue_drops_oldest_when_full_and_keeps_latest_per_key():
    gate_open = threading.Event()
    written: list[tuple[bytes, bytes]] = []
    q = WriteBehindQueue(
        "unit",
        lambda batch: written.extend((k, bytes(v)) for k, v in batch),
        gate=lambda: 0.0 if gate_open.is_set() else 0.05,
        max_items=3,
        max_bytes=1000,
        workers=1,
    )
    dropped = metrics.TIER_DROPPED_WRITES.labels("unit")._value.get()
    for i in range(5):
        q.submit(b"k%d" % i, b"v%d" % i)
    q.submit(b"k3", b"newer")  # replaces the pending k3, no drop
    q.submit(b"big", b"x" * 2000)  # larger than the whole queue: dropped at once
    assert q.depth() == 3 and q.dropped == 3
    assert metrics.TIER_DROPPED_WRITES.labels("unit")._value.get() - dropped == 3
    assert metrics.TIER_QUEUE_DEPTH.labels("unit")._value.get() == 3
    gate_open.set()
    assert q.flush(5)
    assert written == [(b"k2", b"v2"), (b"k4", b"v4"), (b"k3", b"newer")]
    q.close()


def test_queue_discard_forgets_pending_writes_of_deleted_keys():
    gate_open = threading.Event()
    written: list[bytes] = []
    q = WriteBehindQueue(
        "unit-discard",
        lambda batch: written.extend(k for k, _ in batch),
        gate=lambda: 0.0 if gate_open.is_set() else 0.05,
        workers=1,
    )
    for key in (b"a", b"b", b"c"):
        q.submit(key, b"value")
    assert q.discard([b"b", b"never-queued"]) == 1
    assert q.depth() == 2
    gate_open.set()
    assert q.flush(5)
    assert written == [b"a", b"c"]
    q.close()


def test_queue_byte_bound_and_retry_then_drop():
    attempts: list[int] = []

    def failing(batch):
        attempts.append(len(batch))
        raise ConnectionError("down")

    q = WriteBehindQueue("unit2", failing, max_items=100, max_bytes=250, workers=1, max_attempts=2)
    for i in range(3):
        q.submit(b"k%d" % i, b"x" * 100)  # 300 bytes > 250: the oldest goes
    assert q.flush(5)
    assert q.dropped == 3 and sum(attempts) == 4  # two records, two attempts each
    q.close()


def test_queue_skipped_batches_are_not_attempts():
    calls = {"n": 0}

    def writer(batch):
        calls["n"] += 1
        if calls["n"] <= 5:
            raise Skipped()

    q = WriteBehindQueue("unit3", writer, workers=1, max_attempts=1)
    q.submit(b"k", b"v")
    assert q.flush(5)
    assert q.written == 1 and q.dropped == 0
    q.close()


def test_stable_bytes_copies_only_mutable_buffers():
    b = b"abc"
    assert stable_bytes(b) is b
    arena = bytearray(b"abcdef")
    kept = stable_bytes(memoryview(arena)[1:4])
    arena[1:4] = b"XYZ"
    assert bytes(kept) == b"bcd"
    view = memoryview(b"immutable")
    assert stable_bytes(view) is view


def test_queue_flush_times_out_while_tier_is_down():
    q = WriteBehindQueue("unit4", lambda batch: None, gate=lambda: 1.0, workers=1)
    q.submit(b"k", b"v")
    start = time.monotonic()
    assert not q.flush(0.2)
    assert time.monotonic() - start < 1.0  # the 0.2 s flush timeout, with a 5x margin for a loaded machine
    q.close()
    assert q.depth() == 0 and q.dropped == 1
