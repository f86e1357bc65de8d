"""Redis/Valkey shared tier: one key per chunk, large chunks split into ≤ 8 MiB parts.

Layout under the pool's prefix P (hex of the chunk key = H):
  P c:H            the head. Either the whole record (record.py frame, "KVPR…") when it fits in
                   one part, or a manifest ("KVPM…") naming a write generation and the parts.
  P p:H:G:i        part i of the value, written by generation G (the header and key live in
                   the manifest).

Why this cannot be read half-written: parts are written first, under keys unique to their write
(random generation G), and the head is set last in one SET. A reader that sees a manifest reads
exactly that generation's parts; an overwrite in progress writes other keys. Whatever it gets, the
reader verifies the whole record (header, key, length, xxh3 checksum) before returning a byte.
A head whose parts are gone (TTL, eviction by maxmemory) or whose record fails verification is a
miss and is deleted (compare-and-delete, so a newer write is never removed by mistake).

Why parts: one 32 MiB GET keeps one connection and the server's reply path busy for ~100 ms
(ANCHORS.md); ≤ 8 MiB parts fetched over several pooled connections at once move in parallel.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import valkey
from valkey.exceptions import ResponseError

from kvpool.cachenode.core import metrics, record
from kvpool.cachenode.core.settings.shared_tiers import MAX_REDIS_PART, RedisConfig, TierPolicy
from kvpool.cachenode.server.tiers.shared import BackgroundTier

MANIFEST_MAGIC = b"KVPM"
MANIFEST_VERSION = 1
# magic | version u8 | reserved u8 | parts u16 | part_size u32 | record_size u64 | generation 8s
MANIFEST = struct.Struct("<4sBBHIQ8s")
_PEEK = MANIFEST.size + record.HEADER_SIZE + record.MAX_KEY_SIZE  # bytes that hold any manifest
_READ_CHUNK = 1024 * 1024
# The largest record a manifest may describe when the node does not say (its --max-value-size
# default, 256 MiB, plus the record header and the longest key).
DEFAULT_MAX_RECORD_SIZE = (
    256 * 1024 * 1024 + record.HEADER_SIZE + record.MAX_KEY_SIZE
)  # socket read size: 16x valkey-py's default, far fewer syscalls

# Delete KEYS[1] only if it still holds ARGV[1] (a newer write is left alone).
_CAS_DELETE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True, slots=True)
class Manifest:
    parts: int
    part_size: int
    record_size: int
    generation: bytes
    record_header: bytes  # header + key of the record, to check before fetching parts

    def encode(self) -> bytes:
        return (
            MANIFEST.pack(
                MANIFEST_MAGIC,
                MANIFEST_VERSION,
                0,
                self.parts,
                self.part_size,
                self.record_size,
                self.generation,
            )
            + self.record_header
        )

    @classmethod
    def decode(cls, data: bytes, max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> Manifest:
        """Check every field before anything is allocated from it: a stored manifest is input
        (another node, another version, or anyone with access to the server wrote it)."""
        if len(data) < MANIFEST.size + record.HEADER_SIZE:
            raise record.RecordError("manifest too short")
        magic, version, _, parts, part_size, size, gen = MANIFEST.unpack_from(data, 0)
        if magic != MANIFEST_MAGIC or version != MANIFEST_VERSION:
            raise record.RecordError("bad manifest magic or version")
        if size > max_record_size:
            raise record.RecordError(
                f"manifest record of {size} bytes is over the {max_record_size}-byte limit"
            )
        if part_size > MAX_REDIS_PART:
            raise record.RecordError(f"manifest part of {part_size} bytes is over {MAX_REDIS_PART}")
        header = bytes(data[MANIFEST.size :])
        rh = record.decode_header(header)
        if len(header) != record.HEADER_SIZE + rh.key_len or rh.total_size != size:
            raise record.RecordError("manifest does not match its record header")
        if part_size <= 0 or parts < 1 or parts != part_count(size, len(header), part_size):
            raise record.RecordError("manifest part layout is inconsistent")
        return cls(parts, part_size, size, gen, header)

    def key(self) -> bytes:
        return self.record_header[record.HEADER_SIZE :]


def split_value(value: memoryview, part_size: int) -> list[memoryview]:
    """Cut a value into part_size views (the last may be shorter) without copying."""
    if part_size <= 0:
        raise ValueError("part size must be positive")
    return [value[pos : pos + part_size] for pos in range(0, value.nbytes, part_size)]


def part_count(record_size: int, header_size: int, part_size: int) -> int:
    """Parts of a multi-part record: its value (record minus header and key) cut in part_size."""
    return -(-(record_size - header_size) // part_size)


MAX_REPLY_LINE = 64 * 1024  # a RESP line (bulk length or error) longer than this is not Redis


class _ReplyReader:
    """Reads RESP2 bulk replies from a socket, payloads straight into caller buffers.

    The server's reply is input like any other: a bulk length is checked against `max_bulk`
    (the largest head or part this tier writes) before a byte is allocated for it, a line must
    end within MAX_REPLY_LINE, and anything else than a bulk reply is a ConnectionError (the
    caller drops the connection: its stream position is unknown)."""

    def __init__(self, sock, max_bulk: int) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._max_bulk = max_bulk

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by server")
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos : end])
                self._pos = end + 2
                return line
            if len(self._buf) - self._pos > MAX_REPLY_LINE:
                raise ConnectionError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            self._fill()

    def _read_into(self, target: memoryview) -> None:
        have = min(len(self._buf) - self._pos, target.nbytes)
        target[:have] = self._buf[self._pos : self._pos + have]
        self._pos += have
        while have < target.nbytes:
            n = self._sock.recv_into(target[have:])
            if n == 0:
                raise ConnectionError("connection closed by server")
            have += n

    def bulk_into(self, target: memoryview | None) -> memoryview | bytearray | None:
        line = self._line()
        if line[:1] == b"-":
            raise ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b"$" or not (line[1:].isdigit() or line[1:] == b"-1"):
            raise ConnectionError(f"unexpected reply {line[:16]!r}")
        n = int(line[1:])
        if n < 0:
            return None
        if n > self._max_bulk:
            raise ConnectionError(f"bulk reply of {n} bytes is over the {self._max_bulk}-byte limit")
        out: memoryview | bytearray | None
        if target is None:
            out = bytearray(n)
            self._read_into(memoryview(out))
        elif target.nbytes == n:
            out = target
            self._read_into(target)
        else:  # wrong size: drain it to keep the stream in step, report a miss
            out = None
            scratch = memoryview(bytearray(min(n, _READ_CHUNK)))
            while n:
                take = min(n, len(scratch))
                self._read_into(scratch[:take])
                n -= take
        trailer = memoryview(bytearray(2))
        self._read_into(trailer)
        if trailer != b"\r\n":
            raise ConnectionError("bad reply terminator")
        return out


class RedisTier(BackgroundTier):
    def __init__(
        self,
        cfg: RedisConfig,
        policy: TierPolicy | None = None,
        *,
        name: str = "redis",
        max_value_size: int | None = None,
    ) -> None:
        """`max_value_size`: the node's --max-value-size; larger records are refused as corrupt."""
        self.cfg = cfg
        self.max_record_size = (
            DEFAULT_MAX_RECORD_SIZE
            if max_value_size is None
            else max_value_size + record.HEADER_SIZE + record.MAX_KEY_SIZE
        )
        kwargs: dict = dict(
            host=cfg.host,
            port=cfg.port,
            db=cfg.db,
            username=cfg.username,
            password=cfg.password,
            socket_timeout=cfg.timeout,
            socket_connect_timeout=cfg.connect_timeout,
            socket_read_size=_READ_CHUNK,
            # lanes per call are capped at `connections`; headroom so concurrent calls and the
            # background writers wait for a socket rarely (a wait past `timeout` is a failure)
            max_connections=cfg.connections * 4,
            timeout=cfg.timeout,  # wait for a free pooled connection
        )
        if cfg.tls:
            kwargs.update(
                connection_class=valkey.SSLConnection,
                ssl_ca_certs=cfg.tls_ca_file,
                ssl_certfile=cfg.tls_cert_file,
                ssl_keyfile=cfg.tls_key_file,
                ssl_cert_reqs=cfg.tls_cert_reqs,
                ssl_check_hostname=cfg.tls_cert_reqs == "required",
            )
        self._pool = valkey.BlockingConnectionPool(**kwargs)
        self._client = valkey.Valkey(connection_pool=self._pool)
        self._parallel = ThreadPoolExecutor(cfg.connections, thread_name_prefix=f"kvpool-{name}-io")
        self._cas_delete = self._client.register_script(_CAS_DELETE)
        self._ttl_ms = int(cfg.ttl * 1000) if cfg.ttl else None
        super().__init__(name, policy or TierPolicy())

    # -- keys ----------------------------------------------------------------------------------

    def head_key(self, key: bytes) -> bytes:
        return self.cfg.prefix + b"c:" + key.hex().encode()

    def part_key(self, key: bytes, generation: bytes, i: int) -> bytes:
        return self.cfg.prefix + b"p:" + key.hex().encode() + b":" + generation.hex().encode() + b":%d" % i

    # -- reads ---------------------------------------------------------------------------------

    def _read_many(self, keys: Sequence[bytes]) -> list[memoryview | bytes | None]:
        heads = self._get_lanes([(self.head_key(k), None) for k in keys])
        out: list[memoryview | bytes | None] = [None] * len(keys)
        manifests: list[tuple[int, Manifest, bytes]] = []
        nbytes = 0
        for i, (key, head) in enumerate(zip(keys, heads, strict=True)):
            if head is None:
                continue
            if head[:4] == MANIFEST_MAGIC:
                try:
                    manifest = Manifest.decode(head, self.max_record_size)
                    if manifest.key() != key:
                        raise record.RecordError("manifest belongs to another key")
                except record.RecordError:
                    self._discard(key, head, None, "corrupt")
                    continue
                manifests.append((i, manifest, head))
                continue
            try:
                out[i] = record.decode(head, expected_key=key)
                nbytes += len(head)
            except record.RecordError:
                self._discard(key, head, None, "corrupt")
        if manifests:
            nbytes += self._read_parts(keys, manifests, out)
        metrics.TIER_BYTES_READ.labels(self.name).inc(nbytes)
        return out

    def _read_parts(self, keys, manifests: list[tuple[int, Manifest, bytes]], out: list) -> int:
        """Fetch all parts of all manifests over several connections at once, then verify.

        Each part is received straight into its place in the record's buffer (no copies)."""
        buffers: list[bytearray] = []
        jobs: list[tuple[int, bytes, memoryview]] = []  # (manifest index, part key, target)
        for m_idx, (i, manifest, _) in enumerate(manifests):
            buf = bytearray(manifest.record_size)
            hlen = len(manifest.record_header)
            buf[:hlen] = manifest.record_header
            view = memoryview(buf)
            for p in range(manifest.parts):
                start = hlen + p * manifest.part_size
                end = min(start + manifest.part_size, manifest.record_size)
                jobs.append((m_idx, self.part_key(keys[i], manifest.generation, p), view[start:end]))
            buffers.append(buf)
        lanes = min(len(jobs), self.cfg.connections)
        groups = [jobs[g::lanes] for g in range(lanes)]
        broken = [False] * len(manifests)

        def fetch(group: list[tuple[int, bytes, memoryview]]) -> None:
            got = self._get_raw([(part_key, target) for _, part_key, target in group])
            for (m_idx, _, _), data in zip(group, got, strict=True):
                if data is None:
                    broken[m_idx] = True

        futures = [self._parallel.submit(fetch, g) for g in groups[1:]]
        fetch(groups[0])  # the calling thread works too: one lane fewer to hand off
        for f in futures:
            f.result()
        nbytes = 0
        for m_idx, (i, manifest, head) in enumerate(manifests):
            if broken[m_idx]:
                self._discard(keys[i], head, manifest, "missing_part")
                continue
            try:
                out[i] = record.decode(buffers[m_idx], expected_key=keys[i])
                nbytes += manifest.record_size
            except record.RecordError:
                self._discard(keys[i], head, manifest, "corrupt")
        return nbytes

    def _get_lanes(self, jobs: list[tuple[bytes, memoryview | None]]) -> list[memoryview | bytearray | None]:
        """`_get_raw` split over up to `connections` pooled connections at once (contiguous runs
        of keys per lane), so a batch of MiB-sized records is not serialised on one socket."""
        lanes = min(len(jobs), self.cfg.connections)
        if lanes <= 1:
            return self._get_raw(jobs)
        step = -(-len(jobs) // lanes)
        groups = [jobs[i : i + step] for i in range(0, len(jobs), step)]
        futures = [self._parallel.submit(self._get_raw, g) for g in groups[1:]]
        out = self._get_raw(groups[0])
        for f in futures:
            out.extend(f.result())
        return out

    def _get_raw(
        self, jobs: Sequence[tuple[bytes, memoryview | None]]
    ) -> list[memoryview | bytearray | None]:
        """Pipelined GETs on one pooled connection, each reply received with `recv_into`.

        Why not valkey-py's reader: it copies every reply through a BytesIO several times and
        reads 64 KiB per call; receiving straight into the destination is ~2.5x faster for MiB
        values (docs/benchmarks.md). A job's target is a view to fill (None: allocate). A reply
        that is nil, or whose length differs from the target, gives None."""
        conn = self._pool.get_connection("GET")
        try:
            conn.send_packed_command(
                conn.pack_commands([("GET", key) for key, _ in jobs]), check_health=False
            )
            reader = _ReplyReader(conn._sock, self.max_record_size)
            results = [reader.bulk_into(target) for _, target in jobs]
        except BaseException:
            conn.disconnect()  # the stream position is unknown: never reuse this connection
            raise
        finally:
            self._pool.release(conn)
        return results

    def _discard(self, key: bytes, head: bytes, manifest: Manifest | None, why: str) -> None:
        """A record that failed verification (or lost parts) is a miss; remove it, count it."""
        if why == "corrupt":
            metrics.TIER_CORRUPT.labels(self.name).inc()
        else:
            metrics.TIER_ERRORS.labels(self.name, why).inc()
        try:
            self._cas_delete(keys=[self.head_key(key)], args=[bytes(head)])
            if manifest is not None:
                self._client.delete(
                    *[self.part_key(key, manifest.generation, p) for p in range(manifest.parts)]
                )
        except valkey.exceptions.ValkeyError:
            pass  # the record stays a miss; the next reader tries again

    # -- writes --------------------------------------------------------------------------------

    def _write_many(self, items: Sequence[tuple[bytes, memoryview | bytes]]) -> int:
        part_size = self.cfg.part_size
        parts: list[tuple[bytes, memoryview | bytes]] = []
        heads: list[tuple[bytes, bytes, memoryview | None]] = []  # key, head bytes, value to append
        nbytes = 0
        for key, value in items:
            view = memoryview(value).cast("B")
            head = record.encode_header(key, view)
            total = len(head) + view.nbytes
            nbytes += total
            if total <= part_size:
                heads.append((key, head, view))
                continue
            gen = os.urandom(8)
            pieces = split_value(view, part_size)
            manifest = Manifest(len(pieces), part_size, total, gen, head)
            parts.extend((self.part_key(key, gen, p), piece) for p, piece in enumerate(pieces))
            heads.append((key, manifest.encode(), None))
        part_ttl = self._ttl_ms + 60_000 if self._ttl_ms else None  # parts outlive their head
        if parts:
            lanes = min(len(parts), self.cfg.connections)

            def send(group: list[tuple[bytes, memoryview | bytes]]) -> None:
                pipe = self._client.pipeline(transaction=False)
                for part_key, piece in group:
                    pipe.set(part_key, piece, px=part_ttl)
                pipe.execute()

            groups = [parts[g::lanes] for g in range(lanes)]
            futures = [self._parallel.submit(send, g) for g in groups[1:]]
            send(groups[0])
            for f in futures:
                f.result()
        # Each head replaces the old one atomically with a peek at the old one (MULTI: GETRANGE,
        # SET), so an overwritten manifest's parts are found and removed. Not SET ... GET: that
        # would send every old 8 MiB value back just to look at its first bytes.
        pipe = self._client.pipeline(transaction=True)
        # A single-part record goes as SET header + APPEND value inside the same MULTI: readers
        # see both or neither, and the value is sent from the caller's buffer without a copy.
        peeks: list[int] = []
        for key, head, value in heads:
            peeks.append(len(pipe))
            pipe.getrange(self.head_key(key), 0, _PEEK - 1)
            pipe.set(self.head_key(key), head, px=self._ttl_ms)
            if value is not None and value.nbytes:
                pipe.append(self.head_key(key), value)
        replies = pipe.execute()
        self._drop_parts_of(keys=[k for k, _, _ in heads], old_heads=[replies[i] for i in peeks])
        return nbytes

    def _drop_parts_of(self, keys: Sequence[bytes], old_heads: Sequence[bytes | None]) -> None:
        stale: list[bytes] = []
        for key, old in zip(keys, old_heads, strict=True):
            if isinstance(old, bytes) and old[:4] == MANIFEST_MAGIC:
                with contextlib.suppress(record.RecordError):
                    m = Manifest.decode(old)
                    stale.extend(self.part_key(key, m.generation, p) for p in range(m.parts))
        if stale:
            self._client.delete(*stale)

    def _delete_many(self, keys: Sequence[bytes]) -> None:
        pipe = self._client.pipeline(transaction=True)
        for key in keys:
            pipe.getrange(self.head_key(key), 0, _PEEK - 1)
            pipe.delete(self.head_key(key))
        self._drop_parts_of(keys, pipe.execute()[0::2])

    def _close(self) -> None:
        self._parallel.shutdown(wait=False, cancel_futures=True)
        self._pool.disconnect()
