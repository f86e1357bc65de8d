"""Shared strategies: valid frames, and mutations of them (the inputs most likely to get past the
first check of a decoder and trip a later one)."""

from __future__ import annotations

from hypothesis import strategies as st

from kvpool.cachenode.core.record import MAX_KEY_SIZE

keys = st.binary(min_size=1, max_size=MAX_KEY_SIZE)
key_lists = st.lists(keys, max_size=20)


@st.composite
def mutated(draw, frame: bytes) -> bytes:
    """`frame` with a few bytes flipped, cut short, extended or spliced."""
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "set", "cut", "extend", "insert", "delete")))
        if kind in ("flip", "set") and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = (
                data[i] ^ (1 << draw(st.integers(0, 7))) if kind == "flip" else draw(st.integers(0, 255))
            )
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


def frames_or_mutants(frames: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid frames, mutated valid frames, and plain random bytes."""
    return st.one_of(frames, frames.flatmap(mutated), st.binary(max_size=256))
