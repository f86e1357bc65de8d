"""The S3 tier with boto3 against moto's S3 server over HTTP."""

from __future__ import annotations

import os

import pytest

from kvpool.cachenode.core import metrics, record
from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.server.tiers.s3 import S3Tier

MiB = 1024 * 1024


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


@pytest.fixture()
def bucket(s3_server):
    return s3_server.new_bucket()


def make_tier(s3_server, bucket, closing, max_value_size: int | None = None, **kw) -> S3Tier:
    opts = dict(
        s3_url=f"s3://{bucket}/pools/p1",
        s3_endpoint=s3_server.endpoint,
        s3_part_size="5MiB",
        s3_read_part_size="2MiB",
        s3_multipart_threshold="6MiB",
    )
    opts.update(kw)
    cfg = SharedTiersConfig.from_options(**opts)
    tier = S3Tier(cfg.s3, cfg.policy, max_value_size=max_value_size)
    closing(tier)
    return tier


def test_roundtrip_single_put_multipart_and_ranged_reads(s3_server, bucket, closing):
    tier = make_tier(s3_server, bucket, closing)
    tier.size_hint = 5 * MiB  # chunks of this pool are large: read them as parallel ranges
    values = {
        b"small": os.urandom(1000),
        b"ranged": os.urandom(5 * MiB),
        b"multipart": os.urandom(12 * MiB + 3),
    }
    for k, v in values.items():
        tier.submit_put(k, v)
    assert tier.flush(30)
    got = tier.get_many([*values, b"absent"])
    assert [bytes(g) if g is not None else None for g in got] == [*values.values(), None]
    assert tier.ranged_reads >= 2 + 5  # the rest of "ranged" and of "multipart", in 2 MiB ranges
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="pools/p1/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"pools/p1/{k.hex()}" for k in values)
    sizes = {o["Key"]: o["Size"] for o in listed}
    assert sizes[f"pools/p1/{b'multipart'.hex()}"] == record.HEADER_SIZE + 9 + 12 * MiB + 3
    etag = s3_server.client().head_object(Bucket=bucket, Key=f"pools/p1/{b'multipart'.hex()}")["ETag"]
    assert etag.strip('"').endswith("-3")  # 12 MiB went up as a 3-part multipart upload
    # one plain GET per object (read_part_size 0) reads the same bytes
    plain = make_tier(s3_server, bucket, closing, s3_read_part_size="0")
    assert bytes(plain.get_many([b"multipart"])[0]) == values[b"multipart"]
    tier.delete([b"small", b"multipart"])
    assert tier.get_many([b"small", b"multipart", b"ranged"])[:2] == [None, None]


def test_objects_land_under_the_pool_prefix_by_default(s3_server, bucket, closing):
    tier = make_tier(s3_server, bucket, closing, s3_url=f"s3://{bucket}", pool_name="llama")
    tier.submit_put(b"k", b"v")
    assert tier.flush(10)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"kvpool/llama/{b'k'.hex()}"]


@pytest.mark.parametrize("case", ["flip", "truncate", "foreign", "garbage", "flip_in_later_range"])
def test_corrupt_objects_are_misses_deleted_and_counted(s3_server, bucket, closing, case):
    tier = make_tier(s3_server, bucket, closing)
    tier.size_hint = 5 * MiB
    size = 5 * MiB if case == "flip_in_later_range" else 4000
    tier.submit_put(b"victim", os.urandom(size))
    tier.submit_put(b"other", os.urandom(4000))
    assert tier.flush(30)
    s3 = s3_server.client()
    name = tier.object_key(b"victim")
    data = bytearray(s3.get_object(Bucket=bucket, Key=name)["Body"].read())
    if case in ("flip", "flip_in_later_range"):
        data[-3] ^= 0x40
    elif case == "truncate":
        data = data[:-1]
    elif case == "foreign":
        data = bytearray(s3.get_object(Bucket=bucket, Key=tier.object_key(b"other"))["Body"].read())
    else:
        data = bytearray(b"KVPR garbage")
    s3.put_object(Bucket=bucket, Key=name, Body=bytes(data))
    before = counter(metrics.TIER_CORRUPT, "s3")
    assert tier.get_many([b"victim", b"other"])[0] is None
    assert counter(metrics.TIER_CORRUPT, "s3") == before + 1
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert name not in listed and tier.object_key(b"other") in listed


@pytest.mark.parametrize("ranged", [False, True])
def test_an_object_over_the_value_limit_is_refused_before_its_body_is_read(
    s3_server, bucket, closing, ranged
):
    """Whoever can write the bucket cannot make the node allocate more than --max-value-size."""
    tier = make_tier(s3_server, bucket, closing, max_value_size=1 * MiB)
    if ranged:
        tier.size_hint = 5 * MiB  # read as ranges: the size comes from the first range's header
    s3 = s3_server.client()
    name = tier.object_key(b"huge")
    s3.put_object(Bucket=bucket, Key=name, Body=b"KVPR" + os.urandom(8 * MiB))
    tier.submit_put(b"fits", os.urandom(4000))
    assert tier.flush(10)
    read = []  # bytes each real GET's body handed to the tier
    real_get = tier._s3.get_object

    def counted_get(**kw):
        resp = real_get(**kw)
        body_read = resp["Body"].read
        resp["Body"].read = lambda *a: read.append(len(data := body_read(*a))) or data
        return resp

    tier._s3.get_object = counted_get
    before = counter(metrics.TIER_CORRUPT, "s3")
    got = tier.get_many([b"huge", b"fits"])
    assert got[0] is None and got[1] is not None and len(got[1]) == 4000
    assert counter(metrics.TIER_CORRUPT, "s3") == before + 1
    assert sum(read) < 1 * MiB  # only the small value's body was read: never the 8 MiB one
    assert name not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_missing_bucket_is_a_miss_not_an_error(s3_server, closing):
    tier = make_tier(s3_server, "no-such-bucket-here", closing)
    assert tier.get_many([b"k"]) == [None]
