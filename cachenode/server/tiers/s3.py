"""S3 shared tier: one object per chunk (the record frame) under the pool's prefix.

Writes: records below the multipart threshold are one PUT; larger ones a multipart upload whose
parts go up in parallel. S3 makes an object visible only when its PUT or multipart upload
completes, so a reader never sees half an object.

Reads: objects no larger than `read_part_size` (judged by the size of the last object read, as
a pool's chunks are nearly all one size) are one plain GET. For larger ones the first
`read_part_size` bytes are fetched with a ranged GET, whose Content-Range tells the full size; the rest is fetched as parallel ranged GETs pinned to the first reply's
ETag (If-Match), so an overwrite during the read is a miss, never a mix of two objects. With
read_part_size 0 an object is one plain GET: better for servers that materialise the whole object
for every range (moto does; see docs/benchmarks.md), worse for AWS S3 where one connection
moves ~100 MB/s. The whole
record is verified (header, key, length, xxh3) before any byte is returned; one that fails is
deleted and counted.

Credentials and region come from the standard AWS chain (env vars, ~/.aws/config and
credentials files, web identity in Kubernetes); only endpoint and addressing style are ours.
Retries are off: a failure is a miss now and the breaker decides when to try again.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from kvpool.cachenode.core import metrics, record
from kvpool.cachenode.core.settings.shared_tiers import S3Config, TierPolicy
from kvpool.cachenode.server.tiers.shared import BackgroundTier

_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CHANGED = {"PreconditionFailed", "412", "InvalidRange", "416"}


def make_client(cfg: S3Config):
    """A boto3 S3 client for the tier (also used by the benchmark's raw baseline)."""
    config = Config(
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.timeout,
        retries={"max_attempts": 1, "mode": "standard"},
        max_pool_connections=max(10, cfg.concurrency * 2),
        s3={"addressing_style": "path" if cfg.path_style else "auto"},
        # We verify every record ourselves (xxh3); skip botocore's extra CRC pass over the bytes.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config)


def ranges(total: int, start: int, part_size: int) -> list[tuple[int, int]]:
    """Inclusive byte ranges covering [start, total) in part_size steps (pure, for tests)."""
    return [(pos, min(pos + part_size, total) - 1) for pos in range(start, total, part_size)]


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Tier(BackgroundTier):
    def __init__(
        self,
        cfg: S3Config,
        policy: TierPolicy | None = None,
        *,
        name: str = "s3",
        max_value_size: int | None = None,
    ) -> None:
        """`max_value_size`: the node's --max-value-size; a larger object is refused as corrupt
        before its body is read, so whoever can write the bucket cannot make the node allocate
        more than that."""
        self.cfg = cfg
        self.max_record = (
            None if max_value_size is None else max_value_size + record.HEADER_SIZE + record.MAX_KEY_SIZE
        )
        self._s3 = make_client(cfg)
        self._parallel = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix=f"kvpool-{name}-io")
        # Size of the largest object of the last read. Chunks of a pool are nearly all one size, so this says
        # whether the next read pays off as parallel ranges or is best as one plain GET.
        self.size_hint = 0
        self.ranged_reads = 0
        super().__init__(name, policy or TierPolicy())

    def object_key(self, key: bytes) -> str:
        return self.cfg.object_key(key.hex())

    # -- reads ---------------------------------------------------------------------------------

    def _first(self, key: bytes, ranged: bool) -> tuple[bytes, int, str] | None:
        """First range of the object: (bytes, full size, etag) or None when absent."""
        extra = {"Range": f"bytes=0-{self.cfg.read_part_size - 1}"} if ranged else {}
        try:
            resp = self._s3.get_object(Bucket=self.cfg.bucket, Key=self.object_key(key), **extra)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        match = _RANGE_RE.match(resp.get("ContentRange") or "")
        total = int(match.group(3)) if match else int(resp.get("ContentLength") or 0)
        if self.max_record is not None and total > self.max_record:
            resp["Body"].close()  # not a record this node wrote: never read or allocate it
            self._verify(key, b"")  # counted and deleted as corrupt
            return None
        data = resp["Body"].read()
        return data, (total if match else len(data)), resp.get("ETag", "")

    def _range_into(self, key: bytes, etag: str, first: int, last: int, buf: bytearray) -> bool:
        try:
            resp = self._s3.get_object(
                Bucket=self.cfg.bucket, Key=self.object_key(key), Range=f"bytes={first}-{last}", IfMatch=etag
            )
        except ClientError as exc:
            if _code(exc) in _MISSING | _CHANGED:
                return False  # deleted or overwritten since the first range: a miss
            raise
        data = resp["Body"].read()
        self.ranged_reads += 1
        if len(data) != last - first + 1:
            return False
        buf[first : last + 1] = data
        return True

    def _read_many(self, keys: Sequence[bytes]) -> list[memoryview | bytes | None]:
        ranged = bool(self.cfg.read_part_size) and self.size_hint > self.cfg.read_part_size
        firsts = list(self._parallel.map(lambda k: self._first(k, ranged), keys))
        sizes = [f[1] for f in firsts if f is not None]
        if sizes:
            self.size_hint = max(sizes)
        out: list[memoryview | bytes | None] = [None] * len(keys)
        big: list[tuple[int, bytearray, str]] = []
        jobs = []
        for i, (key, first) in enumerate(zip(keys, firsts, strict=True)):
            if first is None:
                continue
            data, total, etag = first
            if total <= len(data):
                out[i] = self._verify(key, data)
                continue
            buf = bytearray(total)
            buf[: len(data)] = data
            big.append((i, buf, etag))
            for lo, hi in ranges(total, len(data), self.cfg.read_part_size):
                jobs.append((len(big) - 1, key, etag, lo, hi, buf))
        if jobs:
            ok = list(self._parallel.map(lambda j: (j[0], self._range_into(*j[1:])), jobs))
            failed = {b for b, good in ok if not good}
            for b, (i, buf, _) in enumerate(big):
                if b not in failed:
                    out[i] = self._verify(keys[i], buf)
        nbytes = sum(memoryview(v).nbytes for v in out if v is not None)
        metrics.TIER_BYTES_READ.labels(self.name).inc(nbytes)
        return out

    def _verify(self, key: bytes, data: bytes | bytearray) -> memoryview | None:
        try:
            return record.decode(data, expected_key=key)
        except record.RecordError:
            metrics.TIER_CORRUPT.labels(self.name).inc()
            with contextlib.suppress(Exception):  # if it fails, the next reader deletes it
                self._s3.delete_object(Bucket=self.cfg.bucket, Key=self.object_key(key))
            return None

    # -- writes --------------------------------------------------------------------------------

    def _write_one(self, key: bytes, value: memoryview | bytes) -> int:
        view = memoryview(value).cast("B")
        head = record.encode_header(key, view)
        total = len(head) + view.nbytes
        name = self.object_key(key)
        if total < self.cfg.multipart_threshold:
            self._s3.put_object(Bucket=self.cfg.bucket, Key=name, Body=head + bytes(view))
            return total
        size = self.cfg.part_size
        first = size - len(head)
        bodies = [lambda: head + bytes(view[:first])]
        bodies += [lambda pos=pos: bytes(view[pos : pos + size]) for pos in range(first, view.nbytes, size)]
        upload = self._s3.create_multipart_upload(Bucket=self.cfg.bucket, Key=name)["UploadId"]
        try:

            def put_part(n: int) -> dict:
                resp = self._s3.upload_part(
                    Bucket=self.cfg.bucket, Key=name, UploadId=upload, PartNumber=n + 1, Body=bodies[n]()
                )
                return {"PartNumber": n + 1, "ETag": resp["ETag"]}

            parts = list(self._parallel.map(put_part, range(len(bodies))))
            self._s3.complete_multipart_upload(
                Bucket=self.cfg.bucket, Key=name, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(Bucket=self.cfg.bucket, Key=name, UploadId=upload)
            raise
        return total

    def _write_many(self, items: Sequence[tuple[bytes, memoryview | bytes]]) -> int:
        if len(items) == 1:
            return self._write_one(*items[0])
        # Small records go up in parallel; a large one uses the pool for its parts (never both,
        # so no pool thread ever waits on the pool).
        threshold = self.cfg.multipart_threshold - record.HEADER_SIZE - record.MAX_KEY_SIZE
        small = [(k, v) for k, v in items if memoryview(v).nbytes < threshold]
        large = [(k, v) for k, v in items if memoryview(v).nbytes >= threshold]
        total = sum(self._parallel.map(lambda kv: self._write_one(*kv), small))
        return total + sum(self._write_one(k, v) for k, v in large)

    def _delete_many(self, keys: Sequence[bytes]) -> None:
        for pos in range(0, len(keys), 1000):
            objects = [{"Key": self.object_key(k)} for k in keys[pos : pos + 1000]]
            self._s3.delete_objects(Bucket=self.cfg.bucket, Delete={"Objects": objects, "Quiet": True})

    def _close(self) -> None:
        self._parallel.shutdown(wait=False, cancel_futures=True)
        self._s3.close()
