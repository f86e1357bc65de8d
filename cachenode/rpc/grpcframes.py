"""Splitting values into the ≤ 4 MiB data frames of the gRPC fallback (shared by client and node)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def split_into_frames(values: Iterable, frame_size: int) -> Iterator[bytes]:
    """The values back-to-back, cut into frames of exactly `frame_size` bytes but the last.

    Always yields at least one frame (possibly empty): the first frame carries the metadata.
    """
    pending = bytearray()
    yielded = False
    for value in values:
        view = memoryview(value).cast("B")
        while view:
            take = min(len(view), frame_size - len(pending))
            pending += view[:take]
            view = view[take:]
            if len(pending) == frame_size:
                yield bytes(pending)
                yielded = True
                pending.clear()
    if pending or not yielded:
        yield bytes(pending)
