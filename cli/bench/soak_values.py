"""The soak's keys and values: each value derived from its key alone, so any process can check
any value it gets without remembering what was put.

A key is 16 bytes (blake3 of the key's number in the keyspace); its value is the key itself
followed by a slice of one fixed pseudo-random block, at an offset and of a length (log-uniform,
a few KiB to a few MiB) both taken from the key's bytes. Another key's value differs in its first
16 bytes and almost surely in its offset, a value shifted or cut inside itself differs from the
block, and a value of the wrong length differs in length: every wrong byte is detected, yet
building the expected value costs one copy, not a hash of the whole value. Pure: no I/O.
"""

from __future__ import annotations

import random

import blake3

KiB = 1024
MiB = 1024 * KiB
MIN_SIZE = 4 * KiB
MAX_SIZE = 4 * MiB
KEY_BYTES = 16
BLOCK_SEED = 20261207


class Values:
    """Keys by number and their values, for sizes `min_size`..`max_size` (log-uniform)."""

    def __init__(self, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE) -> None:
        if not KEY_BYTES < min_size <= max_size:
            raise ValueError(f"sizes must satisfy {KEY_BYTES} < min <= max, got {min_size}..{max_size}")
        self.min_size = min_size
        self.max_size = max_size
        # offsets span max_size, so the block is twice that: every slice fits
        self._block = memoryview(random.Random(BLOCK_SEED).randbytes(2 * max_size))

    @staticmethod
    def key(number: int) -> bytes:
        return blake3.blake3(b"kvpool-soak:%d" % number).digest(KEY_BYTES)

    def size(self, key: bytes) -> int:
        """Log-uniform in [min_size, max_size], from the key's first 4 bytes."""
        u = int.from_bytes(key[:4], "little") / 2**32
        return min(self.max_size, int(self.min_size * (self.max_size / self.min_size) ** u))

    def value(self, key: bytes) -> bytes:
        offset = int.from_bytes(key[4:8], "little") % self.max_size
        body = self.size(key) - KEY_BYTES
        return b"".join((key, self._block[offset : offset + body]))


def wrong_bytes(got: memoryview | bytes, expected: bytes) -> int:
    """Bytes of `got` that differ from `expected`, a length difference counting as that many
    wrong bytes; 0 when they are equal (the common case, one memcmp)."""
    if got == expected:
        return 0
    import numpy as np  # only on the rare path where a value is wrong

    n = min(len(got), len(expected))
    a = np.frombuffer(got, dtype=np.uint8, count=n)
    b = np.frombuffer(expected, dtype=np.uint8, count=n)
    return int(np.count_nonzero(a != b)) + abs(len(got) - len(expected))
