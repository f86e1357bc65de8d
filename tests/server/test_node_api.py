"""The Client against a real node process: both transports, every call, health and metrics."""

from __future__ import annotations

import os
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvpool.cachenode import Client, InvalidRequest, Unavailable

SIZES = [1, 1024, 4 * 1024 * 1024 + 1, 9 * 1024 * 1024]


@pytest.mark.parametrize("data_channel", [True, False], ids=["data-channel", "grpc-fallback"])
def test_put_get_roundtrip(node, data_channel):
    values = {f"rt-{data_channel}-{size}".encode(): os.urandom(size) for size in SIZES}
    with node.client(use_data_channel=data_channel) as client:
        client.put_many(values)
        for key, value in values.items():
            assert client.get(key) == value
        got = client.get_many([*values, b"absent-key"])
        assert set(got) == set(values)
        assert all(got[k] == v for k, v in values.items())
        assert client.get(b"absent-key") is None


def test_transports_see_the_same_store(node):
    value = os.urandom(5 * 1024 * 1024 + 7)  # spans two gRPC frames
    with node.client() as fast, node.client(use_data_channel=False) as slow:
        fast.put(b"shared-1", value)
        assert slow.get(b"shared-1") == value
        slow.put(b"shared-2", value[::-1])
        assert fast.get(b"shared-2") == value[::-1]


def test_get_into_preallocated_buffer(node):
    value = os.urandom(3 * 1024 * 1024)
    buffer = bytearray(4 * 1024 * 1024)
    with node.client() as client:
        client.put(b"into", value)
        assert client.get_into(b"into", buffer) == len(value)
        assert bytes(buffer[: len(value)]) == value
        assert client.get_into(b"into-missing", buffer) is None
        with pytest.raises(InvalidRequest, match="too small"):
            client.get_into(b"into", bytearray(10))
        assert client.get(b"into") == value  # the connection survived the refusal


def test_prefix_hits_contains_delete_stats(node):
    keys = [f"chain-{i}".encode() for i in range(5)]
    with node.client() as client:
        client.put_many({k: b"v" * 10 for k in keys[:3]})
        client.put(keys[4], b"v")
        assert client.prefix_hits(keys) == 3
        assert client.contains(keys) == [True, True, True, False, True]
        assert client.delete([keys[1], b"never-stored"]) == 1
        assert client.prefix_hits(keys) == 1
        assert client.get(keys[1]) is None
        stats = client.stats()
        assert stats["ready"] is True
        assert stats["tiers"]["memory"]["capacity"] == 256 * 1024 * 1024
        assert stats["tiers"]["memory"]["entries"] >= 3


def _pinned_bytes(node) -> float:
    _code, body = _http(node, "/metrics")
    line = next(x for x in body.splitlines() if x.startswith("kvpool_pinned_bytes "))
    return float(line.split()[-1])


def test_lease_pins_a_prefix_until_released_or_expired():
    """Against a small node: a leased prefix survives a flood of puts, then the lease ends."""
    import time

    from .conftest import run_node

    mib = 1024 * 1024
    with run_node("--memory", "8MiB") as small, small.client() as client:
        keys = [b"lease-%d" % i for i in range(3)]
        client.put_many({k: bytes([i]) * mib for i, k in enumerate(keys)})
        count, lease = client.lease_prefix([*keys, b"absent"], lease_ms=60_000)
        assert count == 3 and lease > 0
        assert _pinned_bytes(small) == 3 * mib
        for i in range(20):  # 20 MiB through an 8 MiB node: LRU alone would drop the leased keys
            client.put(b"flood-%d" % i, b"f" * mib)
        assert client.contains(keys) == [True, True, True]
        assert client.stats()["tiers"]["memory"]["used"] <= 8 * mib
        assert client.release(lease, keys[:1]) == 1  # one reader's share
        assert client.release(lease) == 2
        assert client.release(lease) == 0  # already gone: harmless
        assert _pinned_bytes(small) == 0

        count, _ = client.lease_prefix(keys[1:], lease_ms=200)
        assert count == 2 and _pinned_bytes(small) == 2 * mib
        time.sleep(0.3)
        assert client.stats()["pinned_bytes"] == 0  # expired, nothing leaked
        assert _pinned_bytes(small) == 0
        assert client.lease_prefix([b"absent"], lease_ms=1000) == (0, 0)
        with pytest.raises(InvalidRequest, match="lease_ms"):
            client.lease_prefix(keys, lease_ms=3_600_000)


def test_batches_over_the_node_limit_are_split_by_the_client(node):
    values = {f"batch-{i}".encode(): os.urandom(100) for i in range(150)}  # node limit: 64 keys
    with node.client() as client:
        client.put_many(values)
        assert client.get_many(list(values)) == values


def test_health_and_reflection(node):
    target = node.url.removeprefix("grpc://")
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="kvpool.v1.CacheNode"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in response.list_services_response.service}
        assert "kvpool.v1.CacheNode" in names
        assert "grpc.health.v1.Health" in names


def _http(node, path: str, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoints(node):
    with node.client() as client:
        client.put(b"metrics-probe", b"x" * 1000)
        client.get(b"metrics-probe")
    assert _http(node, "/healthz")[0] == 200
    assert _http(node, "/readyz") == (200, "ready\n")
    code, body = _http(node, "/metrics")
    assert code == 200
    puts = [
        line
        for line in body.splitlines()
        if line.startswith('kvpool_node_requests_total{op="put",transport="data"}')
    ]
    assert puts and float(puts[0].split()[-1]) >= 1
    assert "kvpool_tier_usage_bytes" in body
    assert _http(node, "/nope")[0] == 404


def test_unreachable_pool_raises_unavailable():
    from kvpool.cli.devtools.local_servers import free_port

    with Client(f"grpc://127.0.0.1:{free_port()}", timeout=1) as client, pytest.raises(Unavailable):
        client.get(b"k")


def test_bad_urls_are_invalid():
    for url in ("http://x:1", "grpc://nohost", "::"):
        with pytest.raises(InvalidRequest, match="grpc://host:port"):
            Client(url)


def test_concurrent_puts_never_exceed_the_memory_budget():
    """16 threads put 1 MiB values into a 32 MiB node: usage stays within budget, recent values readable."""
    import threading

    from .conftest import run_node

    budget = 32 * 1024 * 1024
    with run_node("--memory", "32MiB") as small:
        errors: list[BaseException] = []
        peak = 0

        def writer(worker: int) -> None:
            nonlocal peak
            try:
                with small.client() as client:
                    for i in range(40):
                        value = bytes([worker]) * (1024 * 1024)
                        client.put(f"w{worker}-{i}".encode(), value)
                        used = client.stats()["tiers"]["memory"]["used"]
                        peak = max(peak, used)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert 0 < peak <= budget
        with small.client() as client:
            stats = client.stats()["tiers"]["memory"]
            assert stats["used"] <= budget and stats["evictions"] > 0
            held = client.get_many([f"w{w}-39".encode() for w in range(16)])
            assert all(v == bytes([int(k[1:].split(b"-")[0])]) * (1024 * 1024) for k, v in held.items())
