"""The Redis/Valkey tier against real valkey-server and redis-server processes."""

from __future__ import annotations

import os
import time

import pytest

from kvpool.cachenode.core import metrics, record
from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.server.tiers.redis import MANIFEST_MAGIC, Manifest, RedisTier

MiB = 1024 * 1024


@pytest.fixture(params=["valkey", "redis"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")


def make_tier(url: str, closing, **kw) -> RedisTier:
    opts = dict(redis_url=url, pool_name=f"t{os.urandom(3).hex()}", redis_part_size="1MiB")
    opts.update(kw)
    cfg = SharedTiersConfig.from_options(**opts)
    tier = RedisTier(cfg.redis, cfg.policy)
    closing(tier)
    return tier


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


def test_roundtrip_small_and_multipart_values(server, closing):
    tier = make_tier(server.url, closing)
    values = {
        b"small": os.urandom(100),
        b"exact": os.urandom(MiB - record.HEADER_SIZE - 5),  # header + key + value == one part
        b"big": os.urandom(3 * MiB + 17),
        b"onepart": os.urandom(MiB),  # the value fills one part; with its header it needs a manifest
        b"empty": b"",
    }
    written = counter(metrics.TIER_BYTES_WRITTEN, "redis")
    read = counter(metrics.TIER_BYTES_READ, "redis")
    for k, v in values.items():
        tier.submit_put(k, v)
    assert tier.flush(10)
    got = tier.get_many([*values, b"absent"])
    payload = sum(record.HEADER_SIZE + len(k) + len(v) for k, v in values.items())
    assert counter(metrics.TIER_BYTES_WRITTEN, "redis") - written == payload
    assert counter(metrics.TIER_BYTES_READ, "redis") - read == payload
    assert [bytes(g) if g is not None else None for g in got] == [*values.values(), None]
    keys = set(server.client().keys(tier.cfg.prefix + b"*"))
    heads = {k for k in keys if b":c:" in k}
    parts = keys - heads
    assert len(heads) == 5 and len(parts) == 5  # "big": 3 MiB + 17 B in 1 MiB parts; "onepart": 1
    head = server.client().get(tier.head_key(b"big"))
    assert head[:4] == MANIFEST_MAGIC and len(head) < 100
    assert counter(metrics.TIER_HITS, "redis") >= 5


def test_overwrite_and_delete_leave_no_parts(server, closing):
    tier = make_tier(server.url, closing)
    tier.submit_put(b"k", os.urandom(3 * MiB))
    assert tier.flush(10)
    new = os.urandom(2 * MiB + 1)
    tier.submit_put(b"k", new)
    assert tier.flush(10)
    assert bytes(tier.get_many([b"k"])[0]) == new
    assert len(server.client().keys(tier.cfg.prefix + b"p:*")) == 3  # the old generation's 3 parts are gone
    tier.delete([b"k"])
    assert server.client().keys(tier.cfg.prefix + b"*") == []
    assert tier.get_many([b"k"]) == [None]


def test_pools_are_isolated_by_prefix(valkey_server, closing):
    a = make_tier(valkey_server.url, closing, pool_name="pool-a")
    b = make_tier(valkey_server.url, closing, pool_name="pool-b")
    a.submit_put(b"k", b"from a")
    assert a.flush(10)
    assert b.get_many([b"k"]) == [None]
    assert bytes(make_tier(valkey_server.url, closing, pool_name="pool-a").get_many([b"k"])[0]) == b"from a"


def test_ttl_applies_to_heads_and_parts(valkey_server, closing):
    tier = make_tier(valkey_server.url, closing, redis_ttl="1h")
    tier.submit_put(b"k", os.urandom(2 * MiB))
    assert tier.flush(10)
    c = valkey_server.client()
    head_ttl = c.pttl(tier.head_key(b"k"))
    part_ttls = [c.pttl(k) for k in c.keys(tier.cfg.prefix + b"p:*")]
    assert 3_500_000 < head_ttl <= 3_600_000
    assert part_ttls and all(t > head_ttl for t in part_ttls)  # parts outlive their head
    short = make_tier(valkey_server.url, closing, redis_ttl="0.3")
    short.submit_put(b"k", b"v")
    assert short.flush(10)
    assert bytes(short.get_many([b"k"])[0]) == b"v"
    time.sleep(0.5)
    assert short.get_many([b"k"]) == [None]


def test_password_and_acl_user(own_valkey, closing):
    admin = own_valkey.client()
    admin.execute_command("ACL", "SETUSER", "kv", "on", ">kv-pass", "~*", "+@all")
    admin.config_set("requirepass", "root-pass")
    port = own_valkey.port
    for url in (f"redis://kv:kv-pass@127.0.0.1:{port}/0", f"valkey://:root-pass@127.0.0.1:{port}/0"):
        tier = make_tier(url, closing)
        tier.submit_put(b"k", b"secret value")
        assert tier.flush(10)
        assert bytes(tier.get_many([b"k"])[0]) == b"secret value"
    wrong = make_tier(f"redis://kv:wrong@127.0.0.1:{port}/0", closing)
    errors = counter(metrics.TIER_ERRORS, "redis", "get")
    assert wrong.get_many([b"k"]) == [None]  # refused: a miss, counted, never raised
    assert counter(metrics.TIER_ERRORS, "redis", "get") == errors + 1


# -- integrity: records corrupted directly in the server --------------------------------------------


def corrupt_cases(tier: RedisTier, c):
    """(name, mutate) pairs; each mutates the stored record of key b'victim'."""

    def flip_small():
        k = tier.head_key(b"victim")
        data = bytearray(c.get(k))
        data[-1] ^= 0xFF
        c.set(k, bytes(data))

    def truncate_small():
        k = tier.head_key(b"victim")
        c.set(k, c.get(k)[:-10])

    def foreign_small():
        c.set(tier.head_key(b"victim"), c.get(tier.head_key(b"other")))

    def garbage_head():
        c.set(tier.head_key(b"victim"), b"not a record at all")

    return [
        ("flip", flip_small),
        ("truncate", truncate_small),
        ("foreign", foreign_small),
        ("garbage", garbage_head),
    ]


@pytest.mark.parametrize("case", ["flip", "truncate", "foreign", "garbage"])
def test_corrupt_single_records_are_misses_deleted_and_counted(valkey_server, closing, case):
    tier = make_tier(valkey_server.url, closing)
    c = valkey_server.client()
    tier.submit_put(b"victim", os.urandom(5000))
    tier.submit_put(b"other", os.urandom(5000))
    assert tier.flush(10)
    dict(corrupt_cases(tier, c))[case]()
    before = counter(metrics.TIER_CORRUPT, "redis")
    assert tier.get_many([b"victim"]) == [None]
    assert counter(metrics.TIER_CORRUPT, "redis") == before + 1
    assert c.get(tier.head_key(b"victim")) is None  # deleted
    assert tier.get_many([b"other"])[0] is not None  # its neighbour is untouched


@pytest.mark.parametrize(
    "case", ["flip_part", "short_part", "missing_part", "swapped_parts", "forged_manifest"]
)
def test_corrupt_multipart_records(server, closing, case):
    tier = make_tier(server.url, closing)
    c = server.client()
    value = os.urandom(3 * MiB)
    tier.submit_put(b"victim", value)
    assert tier.flush(10)
    head = c.get(tier.head_key(b"victim"))
    m = Manifest.decode(head)
    part_keys = [tier.part_key(b"victim", m.generation, p) for p in range(m.parts)]
    if case == "flip_part":
        data = bytearray(c.get(part_keys[1]))
        data[12345] ^= 1
        c.set(part_keys[1], bytes(data))
    elif case == "short_part":
        c.set(part_keys[2], c.get(part_keys[2])[:-1])
    elif case == "missing_part":
        c.delete(part_keys[0])
    elif case == "swapped_parts":
        p0, p1 = c.get(part_keys[0]), c.get(part_keys[1])
        c.set(part_keys[0], p1)
        c.set(part_keys[1], p0)
    else:  # a manifest claiming another key's record header
        forged = Manifest(
            m.parts, m.part_size, m.record_size, m.generation, record.encode_header(b"x", value)
        )
        c.set(tier.head_key(b"victim"), forged.encode())
    corrupt = counter(metrics.TIER_CORRUPT, "redis")
    missing = counter(metrics.TIER_ERRORS, "redis", "missing_part")
    assert tier.get_many([b"victim"]) == [None]
    if case in ("short_part", "missing_part"):
        assert counter(metrics.TIER_ERRORS, "redis", "missing_part") == missing + 1
    else:
        assert counter(metrics.TIER_CORRUPT, "redis") == corrupt + 1
    assert c.get(tier.head_key(b"victim")) is None
    if case != "forged_manifest":
        assert c.keys(tier.cfg.prefix + b"p:*") == []  # its parts went with it


@pytest.mark.parametrize("case", ["absurd", "over_max_value", "huge_parts"])
def test_manifest_sizes_are_bounded_before_allocating(valkey_server, closing, case):
    """A stored manifest is input: a record size it claims is checked before a byte is allocated
    (512 GiB here would raise MemoryError or swap the machine if it were believed)."""
    tier = make_tier(valkey_server.url, closing)
    tier.max_record_size = record.HEADER_SIZE + record.MAX_KEY_SIZE + 2 * MiB  # --max-value-size 2MiB
    c = valkey_server.client()
    value = os.urandom(3 * MiB)
    header = record.encode_header(b"victim", value)
    if case == "absurd":  # consistent layout, 65535 parts of 8 MiB
        size = len(header) + 65535 * 8 * MiB
        forged = Manifest(65535, 8 * MiB, size, b"g" * 8, header)
    elif case == "over_max_value":  # a real 3 MiB record, over this node's 2 MiB limit
        forged = Manifest(3, MiB, len(header) + len(value), b"g" * 8, header)
    else:  # parts larger than any Redis part may be
        forged = Manifest(1, 64 * MiB, len(header) + 60 * MiB, b"g" * 8, header)
    # the record header must match the claimed size for the layout checks to get this far
    rh = record.decode_header(header)
    patched = record.HEADER.pack(
        record.MAGIC, record.VERSION, 0, rh.key_len, forged.record_size - len(header), 0
    )
    forged = Manifest(
        forged.parts, forged.part_size, forged.record_size, forged.generation, patched + b"victim"
    )
    c.set(tier.head_key(b"victim"), forged.encode())
    corrupt = counter(metrics.TIER_CORRUPT, "redis")
    assert tier.get_many([b"victim"]) == [None]
    assert counter(metrics.TIER_CORRUPT, "redis") == corrupt + 1
    assert c.get(tier.head_key(b"victim")) is None


def test_get_many_mixes_hits_misses_and_corrupt_in_one_batch(valkey_server, closing):
    tier = make_tier(valkey_server.url, closing)
    vals = {b"k%d" % i: os.urandom(i * 700_000 + 1) for i in range(6)}
    for k, v in vals.items():
        tier.submit_put(k, v)
    assert tier.flush(20)
    c = valkey_server.client()
    c.set(tier.head_key(b"k2"), b"KVPR" + b"\0" * 40)
    keys = [b"k0", b"nope", b"k2", b"k5", b"k3", b"k1", b"k4"]
    got = tier.get_many(keys)
    expected = [vals.get(k) if k != b"k2" else None for k in keys]
    assert [bytes(g) if g is not None else None for g in got] == expected


def test_tls_with_password(tls_redis, closing):
    server, ca = tls_redis
    url = f"rediss://:tls-pass@127.0.0.1:{server.port}/0?ssl_ca_certs={ca}"
    tier = make_tier(url, closing)
    values = {b"small": os.urandom(1000), b"big": os.urandom(2 * MiB + 1)}
    for k, v in values.items():
        tier.submit_put(k, v)
    assert tier.flush(10)
    assert [bytes(v) for v in tier.get_many(list(values))] == list(values.values())
    plain = make_tier(f"redis://:tls-pass@127.0.0.1:{server.port}/0", closing)
    assert plain.get_many([b"small"]) == [None]  # no TLS: refused, a miss


def test_concurrent_overwrites_never_mix_parts(valkey_server, closing):
    """Readers racing writers of the same multi-part keys get a whole value or a miss."""
    import threading

    tier = make_tier(valkey_server.url, closing)
    keys = [b"race-%d" % i for i in range(3)]
    stop = threading.Event()
    seen = {"hits": 0, "mixed": 0, "errors": []}

    def writer() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            for i, k in enumerate(keys):
                tier.submit_put(k, bytes([version % 251]) * (2 * MiB + 1000 * i + version % 7))
            tier.flush(5)

    def reader() -> None:
        try:
            while not stop.is_set():
                for v in tier.get_many(keys):
                    if v is None:
                        continue
                    seen["hits"] += 1
                    data = bytes(v)
                    if data != data[:1] * len(data):
                        seen["mixed"] += 1
        except BaseException as exc:
            seen["errors"].append(exc)

    corrupt = counter(metrics.TIER_CORRUPT, "redis")
    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert seen["errors"] == [] and seen["mixed"] == 0
    assert seen["hits"] > 10
    assert counter(metrics.TIER_CORRUPT, "redis") == corrupt  # a lost race is a miss, not corruption
    assert tier.breaker.state.value == "closed"
