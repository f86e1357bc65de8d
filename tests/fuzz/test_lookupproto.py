"""The lookup query channel's decoders (rpc/lookupproto.py): requests as the service reads them,
replies as the client reads them. Round trips where an encoder exists; random and mutated frames
decode to checked values or raise FrameError, nothing else; every length is bounded first."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.located import HolderMatch, Located, Score
from kvpool.cachenode.core.record import MAX_KEY_SIZE
from kvpool.cachenode.rpc import lookupproto as lp

from .strategies import frames_or_mutants

MAX_KEYS = 512
u32 = st.integers(0, (1 << 32) - 1)
text = st.text(max_size=40)

infos = st.builds(
    HolderInfo,
    holder_id=st.text(min_size=1, max_size=253),
    kind=st.sampled_from(("agent", "node")),
    tier=st.text(min_size=1, max_size=32),
    address=st.text(max_size=100),
)


@st.composite
def queries(draw):
    size = draw(st.integers(1, MAX_KEY_SIZE))
    count = draw(st.integers(0, 40))
    return size, [draw(st.binary(min_size=size, max_size=size)) for _ in range(count)]


@st.composite
def located(draw):
    asked = draw(st.integers(0, 80))
    prefix = draw(st.integers(0, asked))
    holders = []
    for _ in range(draw(st.integers(0, 5))):
        bitmap = draw(st.binary(min_size=(prefix + 7) // 8, max_size=(prefix + 7) // 8))
        holders.append(HolderMatch(draw(infos), draw(st.integers(0, prefix)), bitmap))
    return asked, Located(prefix, holders, draw(st.booleans()))


@st.composite
def scored(draw):
    asked = draw(st.integers(0, 80))
    prefix = draw(st.integers(0, asked))
    tokens_per_key = draw(st.integers(0, 1024))
    scores = []
    for _ in range(draw(st.integers(0, 5))):
        matched = draw(st.integers(0, prefix))
        scores.append(Score(draw(infos), matched, matched * tokens_per_key))
    return asked, prefix, draw(st.booleans()), tokens_per_key, scores


def read_reply(frame: bytes, asked: int, decode):
    """What the client does with one reply (lookup_channel.QueryConnection.receive)."""
    head = lp.parse_reply(frame[: lp.REPLY.size], asked, lp.max_reply_body(asked))
    assert head.body_len <= lp.max_reply_body(asked)
    body = frame[lp.REPLY.size : lp.REPLY.size + head.body_len]
    if len(body) < head.body_len or head.status != lp.STATUS_OK:
        return head, None
    return head, decode(head, body)


# -- round trips ---------------------------------------------------------------------------------
@given(queries())
def test_locate_request_round_trip(query):
    size, ks = query
    key_size, packed = lp.pack_query(ks)
    frame = lp.encode_locate(key_size, packed)
    request = lp.parse_request(frame[: lp.REQUEST.size], MAX_KEYS)
    assert (request.op, request.count) == (lp.OP_LOCATE, len(ks))
    if ks:
        assert request.key_size == size
    assert frame[lp.REQUEST.size :] == packed and request.body_len == len(packed)


@given(queries(), u32, st.sampled_from(lp.KINDS))
def test_scores_request_round_trip(query, tokens_per_key, kind):
    _, ks = query
    key_size, packed = lp.pack_query(ks)
    request = lp.parse_request(
        lp.encode_scores(key_size, packed, tokens_per_key, kind)[: lp.REQUEST.size], MAX_KEYS
    )
    assert (request.op, request.count, request.kind, request.tokens_per_key) == (
        lp.OP_SCORES, len(ks), kind, tokens_per_key,
    )  # fmt: skip


@given(located())
def test_located_round_trip(case):
    asked, want = case
    frame = lp.encode_located(want, lp.encode_info)
    _head, got = read_reply(frame, asked, lambda h, b: lp.decode_located(h, b, lp.InfoCache()))
    assert got == want


@given(scored())
def test_scores_round_trip(case):
    asked, prefix, authoritative, tpk, want = case
    frame = lp.encode_scores_reply(prefix, authoritative, want, lp.encode_info)
    head, got = read_reply(frame, asked, lambda h, b: lp.decode_scores(h, b, lp.InfoCache(), tpk))
    assert got == want and head.prefix == prefix and head.authoritative == authoritative


@given(st.integers(1, 255), st.text(max_size=3000), st.integers(0, 100))
def test_error_reply_round_trip(status, message, asked):
    head, _ = read_reply(lp.encode_error(status, message), asked, None)
    assert head.status == status and head.body_len <= lp.MAX_MESSAGE


# -- arbitrary and mutated input -----------------------------------------------------------------
def _requests():
    return st.one_of(
        queries().map(lambda q: lp.encode_locate(*lp.pack_query(q[1]))),
        st.builds(
            lambda q, t, k: lp.encode_scores(*lp.pack_query(q[1]), t, k),
            queries(),
            u32,
            st.sampled_from(lp.KINDS),
        ),
    )


@given(frames_or_mutants(_requests()), st.integers(0, MAX_KEYS))
def test_requests_decode_or_frame_error(frame, max_keys):
    if len(frame) < lp.REQUEST.size:
        return
    try:
        request = lp.parse_request(frame[: lp.REQUEST.size], max_keys)
    except lp.FrameError:
        return
    assert request.count <= max_keys and 1 <= request.key_size <= MAX_KEY_SIZE
    assert request.body_len <= max_keys * MAX_KEY_SIZE  # what the service reads for it
    assert request.kind in lp.KINDS


def _replies():
    return st.one_of(
        located().map(lambda c: (c[0], lp.encode_located(c[1], lp.encode_info), None)),
        scored().map(lambda c: (c[0], lp.encode_scores_reply(c[1], c[2], c[4], lp.encode_info), c[3])),
    )


@given(_replies().flatmap(lambda r: frames_or_mutants(st.just(r[1])).map(lambda f: (r[0], f, r[2]))))
def test_replies_decode_or_frame_error(case):
    asked, frame, tokens_per_key = case
    if len(frame) < lp.REPLY.size:
        return
    infos_seen = lp.InfoCache()
    try:
        if tokens_per_key is None:
            head, got = read_reply(frame, asked, lambda h, b: lp.decode_located(h, b, infos_seen))
        else:
            head, got = read_reply(
                frame, asked, lambda h, b: lp.decode_scores(h, b, infos_seen, tokens_per_key)
            )
    except lp.FrameError:
        return
    if got is None:
        return
    assert head.prefix <= asked
    if tokens_per_key is None:
        assert all(m.run <= got.prefix and len(m.bitmap) == (got.prefix + 7) // 8 for m in got.holders)
        assert all(m.info.kind in lp.KINDS for m in got.holders)
    else:
        assert all(s.matched_keys <= head.prefix for s in got)
        assert all(s.matched_tokens == s.matched_keys * tokens_per_key for s in got)


@given(st.binary(max_size=lp.MAX_INFO + 8))
def test_holder_info_decode_or_frame_error(blob):
    try:
        info = lp.InfoCache().get(blob)
    except lp.FrameError:
        return
    assert lp.encode_info(info) == blob or info.kind == ""  # kind code 0 ("any") re-encodes as 0


def test_reply_bodies_are_bounded():
    """The most a client reads for one reply: the service's holder limit times the largest entry."""
    assert lp.max_reply_body(0) <= lp.MAX_ENTRIES * (lp.SCORE.size + lp.MAX_INFO + 1)
