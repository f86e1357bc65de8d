"""The raw baselines of `kvpool bench tiers`: each server's plain client at its best, with the
tier's resources.

Why not valkey-py's `GET` on one connection: the tier reads over `connections` (8) pooled
connections with `recv_into`, and valkey-py's pure-Python reader copies every reply several
times; a baseline with one connection and that reader measures the client, not the server. Here
the keys of a call are split over as many connections as the tier uses (contiguous runs, one lane
each, the calling thread working one), each lane pipelines its GETs and receives every reply with
`recv_into` into one buffer that it reuses for every value, and SETs are sent from memoryviews.
The S3 baseline does the same with boto3: as many lanes as the tier's `concurrency`, each body
read with `readinto` into the lane's reused buffer.

Every read counts the bytes it received and keeps the first and last 16 bytes of each value, so
the bench can show that the baseline moved the bytes it claims (`Moved`), without hashing MiBs
inside the timed pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .moved import Moved


def _lanes(items: list, lanes: int) -> list[list]:
    step = -(-len(items) // max(1, lanes))
    return [items[i : i + step] for i in range(0, len(items), step)]


class _Lanes:
    """Run one function per lane at once, the calling thread taking the first lane."""

    def __init__(self, lanes: int, name: str) -> None:
        self.lanes = max(1, lanes)
        self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix=name) if self.lanes > 1 else None

    def run(self, work: Callable[[int, list], object], items: list) -> list:
        groups = _lanes(items, self.lanes)
        futures = [self._pool.submit(work, i, g) for i, g in enumerate(groups) if i] if self._pool else []
        first = work(0, groups[0]) if groups else None
        return [first, *(f.result() for f in futures)] if groups else []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


class _Resp:
    """RESP2 replies from one socket; bulk payloads received with `recv_into` into a given view."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self._head = bytearray(65536)
        self._view = memoryview(self._head)
        self._start = self._end = 0

    def _line(self) -> bytes:
        while True:
            end = self._head.find(b"\r\n", self._start, self._end)
            if end >= 0:
                line = bytes(self._head[self._start : end])
                self._start = end + 2
                return line
            if self._start:
                self._head[: self._end - self._start] = self._head[self._start : self._end]
                self._end -= self._start
                self._start = 0
            n = self.sock.recv_into(self._view[self._end :])
            if n == 0:
                raise ConnectionError("valkey closed the connection")
            self._end += n

    def _into(self, target: memoryview) -> None:
        have = min(self._end - self._start, target.nbytes)
        target[:have] = self._view[self._start : self._start + have]
        self._start += have
        while have < target.nbytes:
            n = self.sock.recv_into(target[have:])
            if n == 0:
                raise ConnectionError("valkey closed the connection")
            have += n

    def status(self) -> bytes:
        line = self._line()
        if line[:1] == b"-":
            raise ConnectionError(f"valkey: {line[1:].decode(errors='replace')}")
        return line

    def bulk_into(self, buffer: memoryview) -> memoryview | None:
        """The next bulk reply, received into the front of `buffer`; None for nil."""
        line = self.status()
        if line[:1] != b"$":
            raise ConnectionError(f"unexpected reply {line[:16]!r}")
        n = int(line[1:])
        if n < 0:
            return None
        if n > buffer.nbytes:
            raise ConnectionError(f"a {n}-byte value does not fit the {buffer.nbytes}-byte buffer")
        self._into(buffer[:n])
        self._into(memoryview(bytearray(2)))
        return buffer[:n]


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


class RawValkey:
    """GET/SET of whole values over `lanes` connections at once (see the module's docstring)."""

    def __init__(self, cfg, lanes: int, max_size: int) -> None:
        import valkey

        kwargs: dict = dict(
            host=cfg.host, port=cfg.port, db=cfg.db, username=cfg.username, password=cfg.password,
            socket_timeout=120, socket_connect_timeout=cfg.connect_timeout,
        )  # fmt: skip
        cls = valkey.Connection
        if cfg.tls:
            cls = valkey.SSLConnection
            kwargs.update(
                ssl_ca_certs=cfg.tls_ca_file,
                ssl_certfile=cfg.tls_cert_file,
                ssl_keyfile=cfg.tls_key_file,
                ssl_cert_reqs=cfg.tls_cert_reqs,
                ssl_check_hostname=cfg.tls_cert_reqs == "required",
            )
        self._conns = []
        for _ in range(max(1, lanes)):
            conn = cls(**kwargs)
            conn.connect()  # handshake (AUTH, SELECT, TLS) by valkey-py; the bytes by us
            self._conns.append(conn)
        self._readers = [_Resp(c._sock) for c in self._conns]
        self._buffers = [memoryview(bytearray(max_size)) for _ in self._conns]
        self._lanes = _Lanes(len(self._conns), "bench-raw-valkey")
        self.lanes = len(self._conns)

    def put_many(self, items: list[tuple[bytes, bytes]]) -> int:
        """SET every item; the bytes acknowledged with +OK."""

        def lane(i: int, group: list[tuple[bytes, bytes]]) -> int:
            sock, reader = self._conns[i]._sock, self._readers[i]
            for key, value in group:
                sock.sendall(b"*3\r\n$3\r\nSET\r\n" + _bulk(key) + b"$%d\r\n" % len(value))
                sock.sendall(memoryview(value))
                sock.sendall(b"\r\n")
            acked = 0
            for _, value in group:
                if reader.status() == b"+OK":
                    acked += len(value)
            return acked

        return sum(self._lanes.run(lane, items))

    def get_many(self, keys: list[bytes]) -> Moved:
        """GET every key, each lane pipelining its run of keys into its one reused buffer."""

        def lane(i: int, group: list[bytes]) -> Moved:
            sock, reader, buffer = self._conns[i]._sock, self._readers[i], self._buffers[i]
            sock.sendall(b"".join(b"*2\r\n$3\r\nGET\r\n" + _bulk(k) for k in group))
            moved = Moved()
            for _ in group:
                got = reader.bulk_into(buffer)
                if got is None:
                    raise ConnectionError("raw valkey: a stored key is missing")
                moved.add(got)
            return moved

        out = Moved()
        for part in self._lanes.run(lane, keys):
            out.extend(part)
        return out

    def delete(self, keys: list[bytes]) -> None:
        sock, reader = self._conns[0]._sock, self._readers[0]
        sock.sendall(b"*%d\r\n$3\r\nDEL\r\n" % (len(keys) + 1) + b"".join(_bulk(k) for k in keys))
        reader.status()

    def close(self) -> None:
        self._lanes.close()
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.disconnect()


class RawS3:
    """put_object/get_object of whole objects over `lanes` threads, bodies read with `readinto`
    into each lane's reused buffer; the tier's botocore settings (`make_client`)."""

    def __init__(self, client, bucket: str, prefix: str, lanes: int, max_size: int) -> None:
        self._s3, self._bucket, self._prefix = client, bucket, prefix
        self._buffers = [memoryview(bytearray(max_size)) for _ in range(max(1, lanes))]
        self._lanes = _Lanes(len(self._buffers), "bench-raw-s3")
        self.lanes = len(self._buffers)

    def _key(self, key: bytes) -> str:
        return f"{self._prefix}/raw-{key.hex()}"

    def put_many(self, items: list[tuple[bytes, bytes]]) -> int:
        def lane(_i: int, group: list[tuple[bytes, bytes]]) -> int:
            for key, value in group:
                self._s3.put_object(Bucket=self._bucket, Key=self._key(key), Body=value)
            return sum(len(v) for _, v in group)

        return sum(self._lanes.run(lane, items))

    def get_many(self, keys: list[bytes]) -> Moved:
        def lane(i: int, group: list[bytes]) -> Moved:
            moved = Moved()
            for key in group:
                resp = self._s3.get_object(Bucket=self._bucket, Key=self._key(key))
                n = int(resp["ContentLength"])
                target = self._buffers[i][:n]
                stream = resp["Body"]._raw_stream  # urllib3's response: readinto, no copies
                have = 0
                while have < n:
                    got = stream.readinto(target[have:])
                    if not got:
                        raise ConnectionError(f"raw s3: body ended after {have} of {n} bytes")
                    have += got
                resp["Body"].close()
                moved.add(target)
            return moved

        out = Moved()
        for part in self._lanes.run(lane, keys):
            out.extend(part)
        return out

    def delete(self, keys: list[bytes]) -> None:
        for key in keys:
            with contextlib.suppress(Exception):
                self._s3.delete_object(Bucket=self._bucket, Key=self._key(key))

    def close(self) -> None:
        self._lanes.close()
