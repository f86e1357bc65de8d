"""Coverage-guided fuzzing of the pure decoders with atheris (scripts/fuzz.sh runs each target).

    python tests/fuzz/atheris_targets.py --list
    python tests/fuzz/atheris_targets.py TARGET [libFuzzer flags, e.g. -max_total_time=60]

Each target feeds the fuzzer's bytes to one decoder; the module's documented error (FrameError,
RecordError, ChunkFormatError) is the only exception allowed, and a decoded value must satisfy
the decoder's own limits. Anything else is a crash, which libFuzzer reports with the input.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from kvpool.cachenode.core import record
    from kvpool.cachenode.core.errors import RecordError
    from kvpool.cachenode.rpc import dataproto as dp
    from kvpool.cachenode.rpc import lookupproto as lp
    from kvpool.cachenode.server.tiers import redis as rt
    from kvpool.connector import chunkfmt as cf

SPEC = cf.ChunkSpec(
    key=b"k" * 32, fingerprint=b"f" * 32, dtype="float16", shape=(2, 2, 4, 1, 8), token_count=4
)


def data_request(data: bytes) -> None:
    if len(data) < dp.REQUEST_STRUCT.size:
        return
    try:
        op, count, table_len = dp.parse_request_header(data[: dp.REQUEST_STRUCT.size], 64)
        assert count <= 64 and table_len <= dp.max_table_len(op, count)
        table = data[dp.REQUEST_STRUCT.size : dp.REQUEST_STRUCT.size + table_len]
        if op in dp.CONTROL_OPS:
            _, keys = dp.parse_control(op, count, table)
        else:
            keys = [k for k, _ in dp.parse_table(op, count, table)]
        assert len(keys) == count and all(0 < len(k) <= 64 for k in keys)
    except dp.FrameError:
        pass


def lookup_reply(data: bytes) -> None:
    if len(data) < lp.REPLY.size + 1:
        return
    asked = data[0]
    data = data[1:]
    try:
        head = lp.parse_reply(data[: lp.REPLY.size], asked, lp.max_reply_body(asked))
        body = data[lp.REPLY.size : lp.REPLY.size + head.body_len]
        if head.status == lp.STATUS_OK and len(body) == head.body_len:
            located = lp.decode_located(head, body, lp.InfoCache())
            assert located.prefix <= asked
            lp.decode_scores(head, body, lp.InfoCache(), 16)
    except lp.FrameError:
        pass


def lookup_request(data: bytes) -> None:
    if len(data) < lp.REQUEST.size:
        return
    try:
        request = lp.parse_request(data[: lp.REQUEST.size], 512)
        assert request.count <= 512 and request.body_len <= 512 * 64
    except lp.FrameError:
        pass


def stored_record(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        record.decode(data, expected_key=b"k" * 8)


def chunk(data: bytes) -> None:
    with contextlib.suppress(cf.ChunkFormatError):
        cf.decode(data, SPEC)


def manifest(data: bytes) -> None:
    try:
        got = rt.Manifest.decode(data, 1 << 30)
        assert got.record_size <= 1 << 30 and got.part_size <= rt.MAX_REDIS_PART
    except RecordError:
        pass


TARGETS = {
    f.__name__: f for f in (data_request, lookup_reply, lookup_request, stored_record, chunk, manifest)
}

if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        print("\n".join(TARGETS))
        sys.exit(0)
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()
