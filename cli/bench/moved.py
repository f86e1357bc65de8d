"""What a timed pass of a bench moved, so its JSON can show that every path, the baselines
included, moved the bytes it claims: the bytes counted, and the first and last 16 bytes of each
value (kept cheaply inside the pass, compared with the expected values outside it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

SAMPLE = 16  # bytes kept from each end of every value read


@dataclass
class Moved:
    """Bytes moved by one pass, and each value's ends in the order read."""

    nbytes: int = 0
    ends: list[tuple[bytes, bytes]] = field(default_factory=list)

    def add(self, view: memoryview) -> None:
        self.nbytes += view.nbytes
        self.ends.append((bytes(view[:SAMPLE]), bytes(view[-SAMPLE:])))

    def extend(self, other: Moved) -> None:
        self.nbytes += other.nbytes
        self.ends.extend(other.ends)

    def matches(self, values: Sequence[bytes]) -> int:
        """How many values read have the ends of the value expected at their place."""
        return sum(
            1
            for (head, tail), v in zip(self.ends, values, strict=False)
            if head == v[:SAMPLE] and tail == v[-SAMPLE:]
        )
