"""The query channel's framing (rpc/lookupproto.py): round trips, and every bound a decoder keeps."""

from __future__ import annotations

import pytest

from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.located import HolderMatch, Located, Score
from kvpool.cachenode.rpc import lookupproto as lp

A = HolderInfo("agent-a", "agent", "memory", "grpc://10.0.0.1:7420")
N = HolderInfo("node-0", "node", "disk", "grpc://n:7400")


def test_locate_and_scores_round_trip():
    size, packed = lp.pack_query([b"k" * 32] * 3)
    frame = lp.encode_locate(size, packed)
    request = lp.parse_request(frame[: lp.REQUEST.size], max_keys=8)
    assert (request.op, request.key_size, request.count, request.body_len) == (lp.OP_LOCATE, 32, 3, 96)
    assert frame[lp.REQUEST.size :] == packed

    located = Located(10, [HolderMatch(A, 10, b"\xff\x03"), HolderMatch(N, 2, b"\x03\x02")], True)
    reply = lp.encode_located(located, lp.encode_info)
    head = lp.parse_reply(reply[: lp.REPLY.size], asked=12, max_body=1 << 20)
    assert lp.decode_located(head, reply[lp.REPLY.size :], lp.InfoCache()) == located

    ranked = [Score(A, 3, 768), Score(N, 1, 256)]
    reply = lp.encode_scores_reply(4, False, ranked, lp.encode_info)
    head = lp.parse_reply(reply[: lp.REPLY.size], asked=4, max_body=1 << 20)
    assert not head.authoritative
    assert lp.decode_scores(head, reply[lp.REPLY.size :], lp.InfoCache(), 256) == ranked

    frame = lp.encode_scores(size, packed, 256, "node")
    request = lp.parse_request(frame[: lp.REQUEST.size], max_keys=8)
    assert (request.op, request.kind, request.tokens_per_key) == (lp.OP_SCORES, "node", 256)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ((9, 0, 32, 0, 1, 0), "unknown op"),
        ((lp.OP_LOCATE, 4, 32, 0, 1, 0), "flags"),
        ((lp.OP_LOCATE, 0, 0, 0, 1, 0), "key_size"),
        ((lp.OP_LOCATE, 0, 65, 0, 1, 0), "key_size"),
        ((lp.OP_LOCATE, 0, 32, 0, 2**32 - 1, 0), "limit is 8"),
        ((lp.OP_SCORES, 0, 32, 7, 1, 16), "kind"),
        ((lp.OP_LOCATE, 0, 32, 1, 1, 0), "locate request"),
        ((lp.OP_LOCATE, 0, 32, 0, 1, 256), "locate request"),
    ],
)
def test_request_headers_out_of_bounds_are_refused_before_any_body(fields, words):
    with pytest.raises(lp.FrameError, match=words):
        lp.parse_request(lp.REQUEST.pack(*fields), max_keys=8)


def test_hello_is_not_the_data_channels():
    from kvpool.cachenode.rpc import dataproto

    assert lp.parse_hello(lp.encode_hello(b"t" * 32)[: lp.HELLO_STRUCT.size]) == 32
    with pytest.raises(lp.FrameError, match="not a kvpool lookup query channel"):
        lp.parse_hello(dataproto.encode_hello(b"t")[: lp.HELLO_STRUCT.size])
    with pytest.raises(lp.FrameError, match="token length"):
        lp.parse_hello(lp.HELLO_STRUCT.pack(lp.MAGIC, lp.VERSION, 60000))


def test_reply_headers_that_do_not_fit_the_query_are_refused():
    with pytest.raises(lp.FrameError, match="prefix 9"):
        lp.parse_reply(lp.REPLY.pack(0, 1, 0, 9, 0), asked=8, max_body=100)
    with pytest.raises(lp.FrameError, match="over 100"):
        lp.parse_reply(lp.REPLY.pack(0, 1, 0, 8, 101), asked=8, max_body=100)
    with pytest.raises(lp.FrameError, match="flags"):
        lp.parse_reply(lp.REPLY.pack(0, 6, 0, 8, 0), asked=8, max_body=100)
    with pytest.raises(lp.FrameError, match="error message"):
        lp.parse_reply(lp.REPLY.pack(lp.STATUS_INVALID, 0, 0, 0, 1 << 20), asked=8, max_body=100)


def test_malformed_reply_bodies_raise_frame_errors():
    located = Located(9, [HolderMatch(A, 9, b"\xff\x01")], True)
    reply = lp.encode_located(located, lp.encode_info)
    head = lp.parse_reply(reply[: lp.REPLY.size], asked=9, max_body=1 << 20)
    body = reply[lp.REPLY.size :]
    for bad in (body[:-1], body + b"x", body[:3]):
        with pytest.raises(lp.FrameError):
            lp.decode_located(head, bad, lp.InfoCache())
    too_long_run = lp.ENTRY.pack(10, len(lp.encode_info(A))) + lp.encode_info(A) + b"\xff\x01"
    with pytest.raises(lp.FrameError, match="beyond the prefix"):
        lp.decode_located(head, too_long_run, lp.InfoCache())
    broken_info = lp.INFO.pack(1, 200, 0, 0) + b"x"
    with pytest.raises(lp.FrameError, match="does not add up"):
        lp.decode_located(
            head, lp.ENTRY.pack(1, len(broken_info)) + broken_info + b"\x01\x00", lp.InfoCache()
        )
    scores = lp.encode_scores_reply(4, True, [Score(A, 3, 768)], lp.encode_info)
    head = lp.parse_reply(scores[: lp.REPLY.size], asked=4, max_body=1 << 20)
    with pytest.raises(lp.FrameError, match="does not match"):
        lp.decode_scores(head, scores[lp.REPLY.size :], lp.InfoCache(), 16)  # 768 != 3 x 16


def test_queries_of_mixed_key_sizes_are_refused():
    with pytest.raises(ValueError, match="same size"):
        lp.pack_query([b"a" * 32, b"b" * 31])
    with pytest.raises(ValueError, match=r"1\.\.64"):
        lp.pack_query([b"a" * 65])


def test_the_longest_holder_fields_the_service_accepts_fit():
    wide = HolderInfo("é" * 253, "node", "ü" * 32, "grpc://" + "ß" * 505)
    reply = lp.encode_located(Located(1, [HolderMatch(wide, 1, b"\x01")], True), lp.encode_info)
    head = lp.parse_reply(reply[: lp.REPLY.size], asked=1, max_body=lp.max_reply_body(1))
    assert lp.decode_located(head, reply[lp.REPLY.size :], lp.InfoCache()).holders[0].info == wide
